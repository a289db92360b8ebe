"""Training: POST /forward_backward (protobuf, zstd or not, or JSON for SDK <= 0.24; forward_only inside the
proto), legacy POST /forward (JSON) and POST /optim_step (wire doc §2.4).

Submits are deduplicated on (model_id, seq_id) (§1.7) and go to the engine's training queue in arrival order; the
SDK sends them in seq_id order (the chunks of one call concurrently: gradient accumulation does not care which
chunk lands first). Bad data (token ids out of range, mismatched loss_fn_inputs, unknown loss) fails the future
with category "user"; a malformed body is a 400.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from server import wire
from server.access import owned_model
from server.deps import EngineDep, FuturesDep, JsonBody, OwnerDep, StoreDep
from server.routes._submit import adam_params, check_seq_id, untyped_future
from server.store import Store

router = APIRouter()


def _submit_forward_backward(call: wire.ForwardBackwardCall, engine: Any, store: Store, futures: Any,
                             owner: str) -> dict[str, Any]:
    req = call.request
    owned_model(store, req.model_id, owner)
    fb = req.forward_backward_input
    kind = "forward" if call.forward_only else "forward_backward"
    request_id, _ = futures.submit(
        kind,
        lambda: engine.forward_backward(req.model_id, list(fb.data), fb.loss_fn, fb.loss_fn_config,
                                        forward_only=call.forward_only),
        idempotency=None if req.seq_id is None else ("train", req.model_id, req.seq_id), model_id=req.model_id)
    return untyped_future(request_id, model_id=req.model_id)


@router.post("/forward_backward")
async def forward_backward(request: Request, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                           owner: OwnerDep) -> dict[str, Any]:
    body = await request.body()
    # Decoding a large batch is CPU work: keep it off the event loop.
    call = await asyncio.to_thread(wire.decode_forward_backward, body, request.headers.get("content-type"))
    return _submit_forward_backward(call, engine, store, futures, owner)


@router.post("/forward")
async def forward(request: Request, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                  owner: OwnerDep) -> dict[str, Any]:
    body = await request.body()
    call = await asyncio.to_thread(wire.decode_forward_backward, body, request.headers.get("content-type"),
                                   forward_only=True)
    return _submit_forward_backward(call, engine, store, futures, owner)


@router.post("/optim_step")
async def optim_step(body: JsonBody, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                     owner: OwnerDep) -> dict[str, Any]:
    model_id = body.get("model_id")
    owned_model(store, model_id, owner)
    seq_id = check_seq_id(body.get("seq_id"))

    def start():
        return engine.optim_step(model_id, adam_params(body))  # a non-Adam optimizer fails the future ("user")

    request_id, _ = futures.submit("optim_step", start,
                                   idempotency=None if seq_id is None else ("train", model_id, seq_id),
                                   model_id=model_id)
    return untyped_future(request_id, model_id=model_id)
