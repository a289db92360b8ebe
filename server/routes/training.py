"""Training: POST /forward_backward (protobuf, zstd or not, or JSON for SDK <= 0.24; forward_only inside the
proto), legacy POST /forward (JSON) and POST /optim_step (wire doc §2.4).

Submits are deduplicated on (model_id, seq_id) (§1.7) and go to the engine's training queue in arrival order; the
SDK sends them in seq_id order (the chunks of one call concurrently: gradient accumulation does not care which
chunk lands first). Bad data (token ids out of range, mismatched loss_fn_inputs, unknown loss) fails the future
with category "user"; a malformed body is a 400.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any

from fastapi import APIRouter, Request

from server import wire
from server.access import owned_model
from server.deps import EngineDep, FuturesDep, JsonBody, OwnerDep, StoreDep
from server.futures import FutureRegistry
from server.routes._submit import check_seq_id, optim_params, train_key, untyped_future
from server.store import Store
from tinker_jax.engine.api import EngineAPI

router = APIRouter()
log = logging.getLogger(__name__)


def _recorded(store: Store, model_id: str, kind: str, fut: concurrent.futures.Future) -> concurrent.futures.Future:
    """`fut`, whose metrics are recorded for the console once it succeeds (forward_backward and optim_step; a
    forward's are not a training step's). A failure to record is logged, never the request's."""
    if kind == "forward":
        return fut

    def record(f: concurrent.futures.Future) -> None:
        if f.cancelled() or f.exception() is not None:
            return
        try:
            store.add_metrics(model_id, kind, dict(getattr(f.result(), "metrics", None) or {}))
        except Exception:  # noqa: BLE001 - the console's record, not the user's result
            log.exception("recording the metrics of %s for %s failed", kind, model_id)

    fut.add_done_callback(record)
    return fut


def _submit_forward_backward(body: bytes, content_type: str | None, forward_only: bool, engine: EngineAPI,
                             store: Store, futures: FutureRegistry, owner: str) -> dict[str, Any]:
    """In a thread: decoding a large batch and the engine's validation of it are CPU work."""
    call = wire.decode_forward_backward(body, content_type, forward_only=forward_only)
    req = call.request
    model = owned_model(store, req.model_id, owner)
    fb = req.forward_backward_input
    kind = "forward" if call.forward_only else "forward_backward"
    request_id, _ = futures.submit(
        kind,
        lambda: _recorded(store, req.model_id, kind, engine.forward_backward(
            req.model_id, list(fb.data), fb.loss_fn, fb.loss_fn_config, forward_only=call.forward_only,
            tenant=model.session_id)),
        owner=owner, idempotency=train_key(req.model_id, req.seq_id), model_id=req.model_id)
    return untyped_future(request_id, model_id=req.model_id)


@router.post("/forward_backward")
async def forward_backward(request: Request, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                           owner: OwnerDep) -> dict[str, Any]:
    return await asyncio.to_thread(_submit_forward_backward, await request.body(),
                                   request.headers.get("content-type"), False, engine, store, futures, owner)


@router.post("/forward")
async def forward(request: Request, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                  owner: OwnerDep) -> dict[str, Any]:
    return await asyncio.to_thread(_submit_forward_backward, await request.body(),
                                   request.headers.get("content-type"), True, engine, store, futures, owner)


@router.post("/optim_step")
async def optim_step(body: JsonBody, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                     owner: OwnerDep) -> dict[str, Any]:
    model_id = body.get("model_id")
    model = owned_model(store, model_id, owner)
    seq_id = check_seq_id(body.get("seq_id"))

    def start():  # bad parameters, or another optimizer's, fail the future ("user")
        return _recorded(store, model_id, "optim_step",
                         engine.optim_step(model_id, optim_params(body), tenant=model.session_id))

    request_id, _ = futures.submit("optim_step", start, owner=owner,
                                   idempotency=train_key(model_id, seq_id), model_id=model_id)
    return untyped_future(request_id, model_id=model_id)
