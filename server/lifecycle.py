"""Releasing what clients leave behind: sessions that stop heartbeating or are closed, and checkpoints past their
TTL. Runs from the app's background tasks (and from /sessions/{id}/finish), in worker threads."""

from __future__ import annotations

import concurrent.futures
import logging
import threading

from server.samplers import EngineSamplers
from server.store import Store
from tinker_jax.engine.api import EngineAPI
from tinker_jax.errors import Overloaded

log = logging.getLogger(__name__)

UNLOAD_ATTEMPTS = 60  # an unload refused as Overloaded is retried this many times, retry_after_s apart


def release_session(engine: EngineAPI, store: Store, samplers: EngineSamplers, session_id: str) -> tuple[int, int]:
    """Unload the session's training models and drop its sampler snapshots. Returns (models, samplers). Each unload
    is queued behind the requests already submitted for its model, so those still run; checkpoints on disk are
    untouched."""
    models = store.models_of_session(session_id)
    for model_id in models:
        _unload(engine, model_id, session_id, UNLOAD_ATTEMPTS)
    return len(models), samplers.release_session(session_id)


def _unload(engine: EngineAPI, model_id: str, tenant: str, attempts: int) -> None:
    """Submit the unload without waiting for it. The session's queue may be full (a client that vanished with work
    queued): then try again once the engine says it has room, rather than leaving the model's memory held."""
    try:
        future = engine.unload_model(model_id, tenant=tenant)
    except Overloaded as e:
        if attempts <= 1:
            log.error("unloading model %s: still refused after %d attempts (%s); it stays loaded", model_id,
                      UNLOAD_ATTEMPTS, e)
            return
        timer = threading.Timer(e.retry_after_s, _unload, args=(engine, model_id, tenant, attempts - 1))
        timer.daemon = True
        timer.start()
        return
    except Exception:
        log.exception("unloading model %s failed", model_id)
        return
    future.add_done_callback(lambda f: _log_failure(f, f"unloading model {model_id}"))


def _log_failure(future: concurrent.futures.Future, what: str) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("%s failed", what, exc_info=future.exception())


def expire_sessions(engine: EngineAPI, store: Store, samplers: EngineSamplers, timeout_s: float) -> list[str]:
    """Finish every live session without a heartbeat for `timeout_s` and release what it held."""
    expired = store.stale_sessions(timeout_s)
    for session_id in expired:
        store.finish_session(session_id, "expired", f"no heartbeat for {timeout_s:g} s")
        n_models, n_samplers = release_session(engine, store, samplers, session_id)
        log.warning("session %s expired after %g s without a heartbeat; released %d models and %d samplers",
                    session_id, timeout_s, n_models, n_samplers)
    return expired


def delete_checkpoint(engine: EngineAPI, samplers: EngineSamplers, path: str, owner: str) -> bool:
    """Delete a checkpoint (record and files) once every request submitted before on its path has run; blocks until
    then (call it from a thread). Returns whether it existed. Overloaded when the engine's queue is full (the
    request counts against its API key's bound: REST deletes carry no session)."""
    future = engine.delete_checkpoint(path, tenant=f"key:{owner}")
    samplers.unpark(path)  # a parked snapshot of it is stale either way
    return future.result()


def expire_checkpoints(engine: EngineAPI, samplers: EngineSamplers) -> list[str]:
    """Submit deletes for the checkpoints past their TTL (the engine orders and runs them). Returns their paths."""
    expired = engine.expire_checkpoints()
    for path in expired:
        samplers.unpark(path)
    return expired
