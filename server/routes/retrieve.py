"""Futures: POST /retrieve_future (one result, long-polled) and /retrieve_futures (a sampler's completions).

Both are scoped to the caller's key: another key's request id is an unknown one (404), another key's sampling
session too, and acknowledgements (`retrieved_request_ids`) touch only the caller's own futures."""

import math
from typing import Any

from fastapi import APIRouter, Request, Response
from tinker import types

from server import wire
from server.access import owned_sampler
from server.deps import FuturesDep, JsonBody, OwnerDep, StoreDep
from server.routes._submit import check_seq_id
from tinker_jax.errors import UserError

router = APIRouter()


@router.post("/retrieve_future")
async def retrieve_future(request: Request, body: JsonBody, futures: FuturesDep, owner: OwnerDep) -> Response:
    request_id = body.get("request_id")
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise UserError("request_id: must be a string")
    # SDK >= 0.18.1 asks for proto on fwd/bwd and sample results; older ones get those re-encoded as JSON.
    accept_proto = wire.PROTO_CONTENT_TYPE in request.headers.get("accept", "")
    reply = await futures.retrieve(str(request_id), accept_proto, owner=owner)
    return Response(reply.body, status_code=reply.status, media_type=reply.content_type)


@router.post("/retrieve_futures")
async def retrieve_futures(body: JsonBody, futures: FuturesDep, store: StoreDep, owner: OwnerDep) -> dict[str, Any]:
    req = wire.parse_request(types.FuturesRetrieveRequest, body)
    owned_sampler(store, req.target.sampling_session_id, owner)  # 404 for another key's: its completions are theirs
    check_seq_id(req.prev_cursor, "prev_cursor")  # compared in SQL: 64-bit
    check_seq_id(req.target.cloned_sampler_id, "target.cloned_sampler_id")
    if req.timeout is not None and not math.isfinite(req.timeout):  # JSON parsers take NaN and Infinity
        raise UserError(f"timeout: must be a finite number of seconds, got {req.timeout}")
    return await futures.completions(req.target.sampling_session_id, req.target.cloned_sampler_id, req.prev_cursor,
                                     req.timeout, req.retrieved_request_ids, owner=owner)
