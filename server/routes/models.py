"""Models: POST /create_model, /get_info, /unload_model (wire doc §2.3).

A model is named `{session_id}:train:{model_seq_id}` (SDK 0.38 derives that name itself on create-via-load, §1.8)
and is also the engine's training-run id; the engine records the caller's key tag as the run's owner. create_model
is a future: the engine builds the run on its worker for the base model. The store records the model when the create
is accepted (refused past `max_models_per_key`, nothing written) and forgets it if the create fails, so a failed
create neither counts against its key nor answers later requests. A create naming a model already on record (sent
again after its idempotency key was pruned) is refused with a 400 before the engine sees it; the live model keeps
its record.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from tinker import types

from server import wire
from server.access import owned_model, owned_session
from server.deps import EngineDep, FuturesDep, JsonBody, OwnerDep, SettingsDep, StoreDep
from server.errors import ApiError
from server.limits import check_metadata
from server.routes._submit import (check_base_model, check_int64, check_optimizer_config, check_seq_id,
                                   forget_model_on_failure, record_new_model, untyped_future)
from server.settings import ServerSettings
from server.store import Limit
from tinker_jax.errors import NotFound, UserError
from tinker_jax.futures import then

router = APIRouter()


def model_limit(settings: ServerSettings) -> Limit:
    return Limit("models in open sessions", settings.max_models_per_key, "max_models_per_key",
                 settings.session_timeout_s)


@router.post("/create_model")
async def create_model(body: JsonBody, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                       owner: OwnerDep, settings: SettingsDep) -> dict[str, Any]:
    req = wire.parse_request(types.CreateModelRequest, body)
    owned_session(store, req.session_id, owner, live=True)
    check_metadata(settings.max_metadata_bytes, user_metadata=req.user_metadata)
    check_seq_id(req.model_seq_id, "model_seq_id")  # names the model and keys its idempotency
    model_id = store.model_id_for(req.session_id, req.model_seq_id)
    lora = req.lora_config

    def start():  # only for a new (session_id, model_seq_id): a retry gets the first request's future
        record_new_model(store, model_id, req.session_id, owner, model_limit(settings))  # else nothing kept
        return forget_model_on_failure(store, model_id, create)

    def create():
        optimizer = check_optimizer_config(body.get("optimizer_config"))
        check_base_model(engine, req.base_model)
        if lora is not None and lora.rank < 1:
            raise UserError(f"lora_config.rank: must be >= 1, got {lora.rank}")
        if lora is not None:  # the upper bound of rank is the engine's (its config and the model's width)
            check_int64(lora.seed, "lora_config.seed")
        kwargs: dict[str, Any] = {} if lora is None else dict(
            rank=lora.rank, seed=lora.seed, train_mlp=lora.train_mlp, train_attn=lora.train_attn,
            train_unembed=lora.train_unembed, full_finetune=False)
        return then(engine.create_model(req.base_model, model_id=model_id, user_metadata=req.user_metadata,
                                        owner=owner, tenant=req.session_id, optimizer=optimizer, **kwargs),
                    lambda mid: {"model_id": mid, "type": "create_model"})

    request_id, _ = futures.submit("create_model", start, owner=owner,
                                   idempotency=("create_model", req.session_id, req.model_seq_id),
                                   session_id=req.session_id, model_id=model_id)
    return untyped_future(request_id, model_id=model_id)


@router.post("/get_info")
async def get_info(body: JsonBody, engine: EngineDep, store: StoreDep, owner: OwnerDep) -> dict[str, Any]:
    req = wire.parse_request(types.GetInfoRequest, body)
    owned_model(store, req.model_id, owner)
    try:
        info = await asyncio.to_thread(engine.get_info, req.model_id)
    except NotFound as e:  # the engine no longer (or not yet) holds it: released, or the server restarted
        raise ApiError(404, str(e)) from None
    # model_data.model_name must be set: get_tokenizer() asserts it and ephemeral samplers take their base from it.
    out = info.model_dump(mode="json", exclude_none=True)
    # tokenizer_id is the served name, whatever the engine put there (an engine may name its model directory, a
    # server path): the SDK's get_tokenizer loads `tokenizer_id`, else a name derived from model_name, on the client.
    data = out.setdefault("model_data", {})
    data.pop("tokenizer_id", None)
    if data.get("model_name"):
        data["tokenizer_id"] = data["model_name"]
    return {**out, "type": "get_info"}


@router.post("/unload_model")
async def unload_model(body: JsonBody, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                       owner: OwnerDep) -> dict[str, Any]:
    req = wire.parse_request(types.UnloadModelRequest, body)
    model = owned_model(store, req.model_id, owner)
    # Queued behind the model's earlier requests, which still run.
    request_id, _ = futures.submit(
        "unload_model",
        lambda: then(engine.unload_model(req.model_id, tenant=model.session_id),
                     lambda _: {"model_id": req.model_id, "type": "unload_model"}),
        owner=owner, model_id=req.model_id)
    return untyped_future(request_id, model_id=req.model_id)
