"""`build_app(engine, settings)`: the FastAPI app that the unmodified tinker SDK talks to.

The lifespan owns the server's own state (the SQLite store, the future registry, the engine-sampler table and the
background housekeeping tasks); the engine is built and closed by the caller (the CLI), which may outlive or share
it. A corrupt server database stops the startup (`store.CorruptDatabase`, naming the file and the repair command);
at shutdown the store folds its WAL into the main file. The background tasks report to `HealthState`: a failure is
logged once (with its traceback) until it changes or the task recovers, and /healthz reports it meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

from fastapi import Depends, FastAPI

from server import console, downloads, lifecycle, tokens
from server.deps import require_api_key
from server.errors import install_error_handlers, private_paths
from server.futures import FutureRegistry
from server.middleware import RequestBodyMiddleware
from server.routes import (billing, capabilities, checkpoints, client_config, health, models, retrieve, sampling,
                           sessions, telemetry, training)
from server.routes.health import HealthState
from server.samplers import EngineSamplers
from server.settings import ServerSettings
from server.store import Store
from tinker_jax.engine.api import EngineAPI

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"

# Every router here is behind the API-key check.
AUTHENTICATED_ROUTERS = [client_config.router, capabilities.router, sessions.router, telemetry.router,
                         retrieve.router, models.router, training.router, checkpoints.router, sampling.router,
                         billing.router, console.router]

# Routes whose bodies carry data (tokens, tensors): the large body cap; protobuf is accepted on the first two.
DATA_PATHS = (f"{API_PREFIX}/forward_backward", f"{API_PREFIX}/forward", f"{API_PREFIX}/asample")
PROTO_PATHS = (f"{API_PREFIX}/forward_backward", f"{API_PREFIX}/forward")


def build_app(engine: EngineAPI, settings: ServerSettings, *, stop_engine: bool = False) -> FastAPI:
    """`engine` implements `tinker_jax.engine.api.EngineAPI`, the only engine surface the routes use (the bootstrap
    routes only need `capabilities()`). `stop_engine` (`tinker-jax serve`): when the app stops, it shuts the engine
    down before it stops recording results, so requests that finish during the engine's shutdown (a checkpoint write
    in flight) are recorded, not reported lost at the next start; the engine must then not be used again."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(settings.db_path)  # CorruptDatabase: the startup fails with the file and the repair command
        try:
            async with _serving(app, engine, store, settings, stop_engine):
                yield
        finally:
            store.close()  # folds the WAL into the main file, even when the startup failed half-way

    # No OpenAPI/docs: the routes read raw bodies (JSON or protobuf), so a generated schema would only mislead.
    app = FastAPI(title="tinker-jax", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.engine, app.state.settings, app.state.health = engine, settings, HealthState()
    install_error_handlers(app)
    app.add_middleware(RequestBodyMiddleware, max_json_bytes=settings.max_json_body_bytes,
                       max_data_bytes=settings.max_body_bytes, read_timeout_s=settings.body_read_timeout_s,
                       data_paths=DATA_PATHS, proto_paths=PROTO_PATHS)
    app.include_router(health.router, prefix=API_PREFIX)
    # Signed download URLs carry their own credential (server.downloads); these routes check it, not an API key.
    secret = downloads.load_key(settings.url_key_path)
    app.state.signer = downloads.Signer(secret, settings.download_url_ttl_s)
    app.state.tokens = tokens.Tokens(secret, settings.jwt_ttl_s)
    app.include_router(downloads.router, prefix=API_PREFIX)
    app.include_router(console.public)  # the page and its static files; its data is behind the key (below)
    for router in AUTHENTICATED_ROUTERS:
        app.include_router(router, prefix=API_PREFIX, dependencies=[Depends(require_api_key)])
    return app


@contextlib.asynccontextmanager
async def _serving(app: FastAPI, engine: EngineAPI, store: Store, settings: ServerSettings,
                   stop_engine: bool) -> AsyncIterator[None]:
    """Everything the lifespan runs on top of the open store: the future registry, the samplers, the tasks."""
    lost = store.mark_lost()
    if lost:
        log.warning("%d requests were still pending when the server last stopped; marked lost", lost)
    futures = FutureRegistry(store, long_poll_s=settings.long_poll_s,
                             retrieve_futures_poll_s=settings.retrieve_futures_poll_s,
                             private_paths=private_paths(settings.data_dir),
                             max_queued_per_key=settings.max_queued_per_key)
    futures.bind_loop(asyncio.get_running_loop())
    samplers = EngineSamplers(engine, settings.max_samplers_per_session)
    app.state.store, app.state.futures, app.state.samplers = store, futures, samplers
    health_state = app.state.health
    tasks = [asyncio.create_task(_prune_forever(engine, store, samplers, settings, health_state)),
             asyncio.create_task(_expire_sessions_forever(engine, store, samplers, settings, health_state))]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            if stop_engine:  # its last requests finish (or fail) now, while their results can still be recorded
                await asyncio.to_thread(engine.shutdown)
        finally:
            futures.close()  # no completion is written after this: the store closes next


async def _run_reported(task: str, health: HealthState, fn, *args):
    """Run `fn(*args)` in a thread for a background task. A failure is logged once (with its traceback) until it
    changes or the task succeeds again, and /healthz reports it meanwhile; it never stops the task's loop."""
    try:
        result = await asyncio.to_thread(fn, *args)
    except Exception as e:  # noqa: BLE001 - the loop must go on; health reports it
        if health.failed(task, e):
            log.error("%s failed (logged once until it changes; /healthz reports it)", task, exc_info=e)
        return None
    if health.succeeded(task):
        log.warning("%s works again", task)
    return result


async def _prune_forever(engine: EngineAPI, store: Store, samplers: EngineSamplers, settings: ServerSettings,
                         health: HealthState) -> None:
    """Finished futures hold result payloads (fwd/bwd outputs are MBs), so they cannot live forever; checkpoints
    with a TTL are deleted once it passes."""
    while True:
        await asyncio.sleep(settings.prune_interval_s)
        removed = await _run_reported("pruning futures", health, store.prune, settings.future_ttl_s,
                                      settings.retrieved_ttl_s)
        if removed:
            log.info("pruned %d expired futures", removed)
        await _run_reported("expiring checkpoints", health, lifecycle.expire_checkpoints, engine, samplers)


async def _expire_sessions_forever(engine: EngineAPI, store: Store, samplers: EngineSamplers,
                                   settings: ServerSettings, health: HealthState) -> None:
    """Sessions whose clients vanished (no heartbeat for session_timeout_s) release their models and samplers."""
    while True:
        await asyncio.sleep(settings.session_check_interval_s)
        await _run_reported("expiring sessions", health, lifecycle.expire_sessions, engine, store, samplers,
                            settings.session_timeout_s)
