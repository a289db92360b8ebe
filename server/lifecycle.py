"""Releasing what clients leave behind: sessions that stop heartbeating or are closed, and checkpoints past their
TTL. Runs from the app's background task (and from /sessions/{id}/finish)."""

from __future__ import annotations

import logging
import shutil
from typing import Any

from server.samplers import EngineSamplers
from server.store import Store
from tinker_jax.engine.registry import TinkerPath

log = logging.getLogger(__name__)


def release_session(engine: Any, store: Store, samplers: EngineSamplers, session_id: str) -> tuple[int, int]:
    """Unload the session's training models and drop its sampler snapshots. Returns (models, samplers). Requests
    still queued for those models fail with "unknown model"; checkpoints on disk are untouched."""
    models = store.models_of_session(session_id)
    unload = getattr(engine, "unload_model", None)
    if unload is not None:
        for model_id in models:
            try:
                unload(model_id)
            except Exception:
                log.exception("unloading model %s failed", model_id)
    return len(models), samplers.release_session(session_id)


def expire_sessions(engine: Any, store: Store, samplers: EngineSamplers, timeout_s: float) -> list[str]:
    """Finish every live session without a heartbeat for `timeout_s` and release what it held."""
    expired = store.stale_sessions(timeout_s)
    for session_id in expired:
        store.finish_session(session_id, "expired", f"no heartbeat for {timeout_s:g} s")
        n_models, n_samplers = release_session(engine, store, samplers, session_id)
        log.warning("session %s expired after %g s without a heartbeat; released %d models and %d samplers",
                    session_id, timeout_s, n_models, n_samplers)
    return expired


def delete_checkpoint(engine: Any, samplers: EngineSamplers | None, p: TinkerPath) -> bool:
    """Remove a checkpoint's registry row and its files. Returns whether it existed."""
    existed = engine.registry.delete_checkpoint(p)
    shutil.rmtree(engine.registry.checkpoint_dir(p), ignore_errors=True)
    if samplers is not None:
        samplers.unpark(str(p))
    return existed


def expire_checkpoints(engine: Any, samplers: EngineSamplers | None) -> list[TinkerPath]:
    registry = getattr(engine, "registry", None)
    if registry is None:
        return []
    expired = registry.expired()
    for p in expired:
        delete_checkpoint(engine, samplers, p)
        log.info("checkpoint %s expired (TTL) and was deleted", p)
    return expired
