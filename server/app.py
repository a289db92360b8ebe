"""`build_app(engine, settings)`: the FastAPI app that the unmodified tinker SDK talks to.

The lifespan owns the server's own state (the SQLite store, the future registry, the engine-sampler table and the
background housekeeping task); the engine is built and closed by the caller (the CLI), which may outlive or share
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

from fastapi import Depends, FastAPI

from server import lifecycle
from server.deps import require_api_key
from server.errors import install_error_handlers
from server.futures import FutureRegistry
from server.middleware import DecompressRequestMiddleware
from server.routes import (capabilities, checkpoints, client_config, health, models, retrieve, sampling, sessions,
                           telemetry, training)
from server.samplers import EngineSamplers
from server.settings import ServerSettings
from server.store import Store
from tinker_jax.engine.api import EngineAPI

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"

# Every router here is behind the API-key check.
AUTHENTICATED_ROUTERS = [client_config.router, capabilities.router, sessions.router, telemetry.router,
                         retrieve.router, models.router, training.router, checkpoints.router, sampling.router]


def build_app(engine: EngineAPI, settings: ServerSettings) -> FastAPI:
    """`engine` implements `tinker_jax.engine.api.EngineAPI`, the only engine surface the routes use (the bootstrap
    routes only need `capabilities()`)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(settings.db_path)
        lost = store.mark_lost()
        if lost:
            log.warning("%d requests were still pending when the server last stopped; marked lost", lost)
        futures = FutureRegistry(store, long_poll_s=settings.long_poll_s,
                                 retrieve_futures_poll_s=settings.retrieve_futures_poll_s)
        futures.bind_loop(asyncio.get_running_loop())
        samplers = EngineSamplers(engine, settings.max_samplers_per_session)
        app.state.store, app.state.futures, app.state.samplers = store, futures, samplers
        tasks = [asyncio.create_task(_prune_forever(engine, store, samplers, settings)),
                 asyncio.create_task(_expire_sessions_forever(engine, store, samplers, settings))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            futures.close()
            store.close()

    # No OpenAPI/docs: the routes read raw bodies (JSON or protobuf), so a generated schema would only mislead.
    app = FastAPI(title="tinker-jax", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.engine, app.state.settings = engine, settings
    install_error_handlers(app)
    app.add_middleware(DecompressRequestMiddleware, max_bytes=settings.max_body_bytes)
    app.include_router(health.router, prefix=API_PREFIX)
    for router in AUTHENTICATED_ROUTERS:
        app.include_router(router, prefix=API_PREFIX, dependencies=[Depends(require_api_key)])
    return app


async def _prune_forever(engine: EngineAPI, store: Store, samplers: EngineSamplers, settings: ServerSettings) -> None:
    """Finished futures hold result payloads (fwd/bwd outputs are MBs), so they cannot live forever; checkpoints
    with a TTL are deleted once it passes."""
    while True:
        await asyncio.sleep(settings.prune_interval_s)
        try:
            removed = await asyncio.to_thread(store.prune, settings.future_ttl_s, settings.retrieved_ttl_s)
            if removed:
                log.info("pruned %d expired futures", removed)
            await asyncio.to_thread(lifecycle.expire_checkpoints, engine, samplers)
        except Exception:
            log.exception("pruning futures or checkpoints failed")


async def _expire_sessions_forever(engine: EngineAPI, store: Store, samplers: EngineSamplers,
                                   settings: ServerSettings) -> None:
    """Sessions whose clients vanished (no heartbeat for session_timeout_s) release their models and samplers."""
    while True:
        await asyncio.sleep(settings.session_check_interval_s)
        try:
            await asyncio.to_thread(lifecycle.expire_sessions, engine, store, samplers, settings.session_timeout_s)
        except Exception:
            log.exception("expiring sessions failed")
