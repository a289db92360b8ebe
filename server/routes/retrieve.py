"""Futures: POST /retrieve_future (one result, long-polled) and /retrieve_futures (a sampler's completions)."""

from typing import Any

from fastapi import APIRouter, Request, Response
from tinker import types

from server import wire
from server.deps import FuturesDep, JsonBody
from tinker_jax.errors import UserError

router = APIRouter()


@router.post("/retrieve_future")
async def retrieve_future(request: Request, body: JsonBody, futures: FuturesDep) -> Response:
    request_id = body.get("request_id")
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise UserError("request_id: must be a string")
    # SDK >= 0.18.1 asks for proto on fwd/bwd and sample results; older ones get those re-encoded as JSON.
    accept_proto = wire.PROTO_CONTENT_TYPE in request.headers.get("accept", "")
    reply = await futures.retrieve(str(request_id), accept_proto)
    return Response(reply.body, status_code=reply.status, media_type=reply.content_type)


@router.post("/retrieve_futures")
async def retrieve_futures(body: JsonBody, futures: FuturesDep) -> dict[str, Any]:
    req = wire.parse_request(types.FuturesRetrieveRequest, body)
    return await futures.completions(req.target.sampling_session_id, req.target.cloned_sampler_id, req.prev_cursor,
                                     req.timeout, req.retrieved_request_ids)
