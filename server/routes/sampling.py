"""Sampling: POST /create_sampling_session, GET /samplers/{id}, POST /join_sampling_session, /asample,
/cancel_future (wire doc §2.6).

A sampling session is `{session_id}:sample:{n}`; it samples a tinker path, a base model, or (ephemeral, from
save_weights_for_sampler) a training model's weights at the time of the save. `server.samplers` maps it to the
engine's weight snapshot. asample answers at once with `sample_sequence_ids` (required from SDK 0.26); the
result is a `tinker.types.SampleResponse`, served as protobuf. Features the engine lacks are refused with a user
error, never silently ignored (the SDK raises on some of them, §2.6).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from tinker import types

from server import wire
from server.access import owned_sampler, owned_session, readable_checkpoint
from server.deps import CallerDep, EngineDep, FuturesDep, JsonBody, OwnerDep, SamplersDep, StoreDep
from server.routes._submit import check_base_model, check_seq_id, untyped_future
from tinker_jax.errors import UserError
from tinker_jax.futures import then
from tinker_jax.sampling.response import last_n_mask

router = APIRouter()

# The reply lists one id per sample (`sample_sequence_ids`), built before the engine sees the request, so the count
# is bounded here too: far above any engine's own limit (SamplerConfig.max_num_samples, checked by the engine with
# its value), low enough that a hostile num_samples cannot make the server build a list of 10**18 strings.
MAX_NUM_SAMPLES = 10_000


@router.post("/create_sampling_session")
async def create_sampling_session(body: JsonBody, engine: EngineDep, store: StoreDep, samplers: SamplersDep,
                                  caller: CallerDep) -> dict[str, Any]:
    """Nothing free-form is stored: model_path must name a checkpoint the caller may read (else 404) and
    base_model a served model (else 400), both checked before the store sees them."""
    req = wire.parse_request(types.CreateSamplingSessionRequest, body)
    owned_session(store, req.session_id, caller.owner, live=True)
    check_seq_id(req.sampling_session_seq_id, "sampling_session_seq_id")
    if req.model_path:  # both given: the path wins
        readable_checkpoint(engine, req.model_path, caller, "model_path")
        info = await asyncio.to_thread(engine.weights_info, req.model_path)
        base_model, model_path = info["base_model"], req.model_path
    elif req.base_model:
        check_base_model(engine, req.base_model)
        base_model, model_path = req.base_model, None
    else:
        raise UserError("create_sampling_session: give model_path (tinker://...) or base_model")
    row = store.create_sampling_session(req.session_id, req.sampling_session_seq_id, base_model=base_model,
                                        model_path=model_path)
    await samplers.resolve(row, caller)  # build the snapshot now: errors surface here, and the first sample is quick
    return {"sampling_session_id": row.sampling_session_id, "type": "create_sampling_session"}


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, store: StoreDep, owner: OwnerDep) -> dict[str, Any]:
    row = owned_sampler(store, sampler_id, owner)
    return {"sampler_id": row.sampling_session_id, "base_model": row.base_model or "", "model_path": row.model_path}


@router.post("/join_sampling_session")
async def join_sampling_session(body: JsonBody, store: StoreDep, owner: OwnerDep) -> dict[str, Any]:
    req = wire.parse_request(types.JoinSamplingSessionRequest, body)
    owned_sampler(store, req.sampling_session_id, owner)
    return {"client_counter": store.join_sampling_session(req.sampling_session_id), "type": "join_sampling_session"}


@router.post("/asample")
async def asample(body: JsonBody, engine: EngineDep, store: StoreDep, futures: FuturesDep, samplers: SamplersDep,
                  caller: CallerDep) -> dict[str, Any]:
    owner = caller.owner
    req = wire.parse_request(types.SampleRequest, body)
    if not req.sampling_session_id:
        raise UserError("sampling_session_id: required (this server does not serve the pre-0.3 sessionless form)")
    row = owned_sampler(store, req.sampling_session_id, owner)
    check_seq_id(req.seq_id)
    if isinstance(req.num_samples, bool) or not 1 <= req.num_samples <= MAX_NUM_SAMPLES:
        raise UserError(f"num_samples: must be between 1 and {MAX_NUM_SAMPLES}, got {req.num_samples}")
    seq_id = req.seq_id if req.seq_id is not None else 0
    sequence_ids = [f"{row.sampling_session_id}:{seq_id}:{i}" for i in range(req.num_samples)]
    try:
        engine_id, lost = await samplers.resolve(row, caller), None
    except UserError as e:  # weights gone (ephemeral) or no longer readable (a path): the future says why
        engine_id, lost = None, e

    def start():
        if lost is not None:
            raise lost
        prompt_len = req.prompt.length
        post = last_n_mask(req.prompt_logprobs_last_n, prompt_len,
                           bool(req.prompt_logprobs or req.topk_prompt_logprobs))
        future = engine.sample(engine_id, req.prompt, req.num_samples, req.sampling_params,
                               include_prompt_logprobs=bool(req.prompt_logprobs),
                               topk_prompt_logprobs=int(req.topk_prompt_logprobs or 0), tenant=row.session_id,
                               topk_sample_logprobs=req.topk_sample_logprobs or 0,
                               target_prompt_logprobs=req.target_prompt_logprobs,
                               prompt_alt_tokens_k=req.prompt_alt_tokens_k or 0,
                               record_stability_info=bool(req.record_stability_info), sequence_ids=sequence_ids)
        return future if post is None else then(future, post)

    # In a thread: the first sample of a base model builds its sampler.
    request_id, _ = await asyncio.to_thread(
        futures.submit, "sample", start,
        idempotency=None if req.seq_id is None else ("sample", row.sampling_session_id, req.seq_id),
        owner=owner, session_id=row.session_id, sampling_session_id=row.sampling_session_id, seq_id=seq_id)
    return untyped_future(request_id, sample_sequence_ids=sequence_ids)


@router.post("/cancel_future")
async def cancel_future(body: JsonBody, futures: FuturesDep, owner: OwnerDep) -> dict[str, Any]:
    """Another key's request is answered like a finished one (`cancelled: false`): ids cannot be probed."""
    request_id = body.get("request_id")
    if not isinstance(request_id, str):
        raise UserError("request_id: must be a string")
    return {"request_id": request_id, "cancelled": futures.cancel(request_id, owner)}
