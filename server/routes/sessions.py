"""Sessions: POST /create_session, /session_heartbeat, /sessions/{session_id}/finish (wire doc §2.2), and the REST
reads GET /sessions, GET /sessions/{session_id}."""

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from tinker import types

from server import wire
from server.access import owned_session
from server.deps import EngineDep, JsonBody, OwnerDep, SamplersDep, SettingsDep, StoreDep
from server.errors import ApiError
from server.lifecycle import release_session
from server.limits import check_metadata
from server.settings import ServerSettings
from server.store import Limit
from tinker_jax.errors import UserError

router = APIRouter()


def session_limit(settings: ServerSettings) -> Limit:
    return Limit("open sessions", settings.max_sessions_per_key, "max_sessions_per_key", settings.session_timeout_s)


@router.post("/create_session")
async def create_session(body: JsonBody, store: StoreDep, owner: OwnerDep, settings: SettingsDep,
                         x_idempotency_key: Annotated[str | None, Header()] = None) -> dict[str, Any]:
    # tags/sdk_version are required by the SDK type but harmless to default for odd clients (null == missing).
    defaults = {"tags": [], "sdk_version": "unknown"}
    req = wire.parse_request(types.CreateSessionRequest,
                             {**defaults, **{k: v for k, v in body.items() if v is not None}})
    check_metadata(settings.max_metadata_bytes, tags=req.tags, user_metadata=req.user_metadata,
                   sdk_version=req.sdk_version, project_id=req.project_id, display_name=req.display_name)
    if x_idempotency_key is not None and len(x_idempotency_key) > 256:
        raise UserError("X-Idempotency-Key: longer than 256 characters")
    session_id = store.create_session(
        owner=owner, tags=req.tags, user_metadata=req.user_metadata, sdk_version=req.sdk_version,
        project_id=req.project_id, display_name=req.display_name, limit=session_limit(settings),
        # The SDK keeps X-Idempotency-Key across its own HTTP retries of one call: a retry gets the same session.
        idempotency_key=f"{owner}:{x_idempotency_key}" if x_idempotency_key else None)
    return {"session_id": session_id, "type": "create_session"}


@router.post("/session_heartbeat")
async def session_heartbeat(body: JsonBody, store: StoreDep, owner: OwnerDep) -> dict[str, str]:
    req = wire.parse_request(types.SessionHeartbeatRequest, body)
    if owned_session(store, req.session_id, owner).finished is not None:
        raise ApiError(410, f"session {req.session_id!r} is finished")  # 410 stops the SDK's heartbeat loop
    store.heartbeat(req.session_id)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, body: JsonBody, store: StoreDep, owner: OwnerDep, engine: EngineDep,
                         samplers: SamplersDep, settings: SettingsDep) -> dict[str, Any]:
    was_live = owned_session(store, session_id, owner).finished is None
    reason = body.get("reason")
    reason_type = reason.get("type") if isinstance(reason, dict) else reason
    if reason_type is not None and not isinstance(reason_type, str):
        raise UserError(f"reason.type: must be a string, got {reason_type!r}")
    detail = body.get("detail")
    check_metadata(settings.max_metadata_bytes, **{"reason.type": reason_type, "detail": detail})
    row = store.finish_session(session_id, reason_type or "unspecified", None if detail is None else str(detail))
    assert row is not None
    if was_live:  # the client is done with its models: free them (its checkpoints stay)
        await asyncio.to_thread(release_session, engine, store, samplers, session_id)
    return {"session_id": session_id, "finish_reason": row.finish_reason}


@router.get("/sessions")
async def list_sessions(store: StoreDep, owner: OwnerDep, limit: Annotated[int, Query(ge=0, le=10_000)] = 20,
                        offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
    return {"sessions": store.list_sessions(owner, limit, offset)}


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, store: StoreDep, owner: OwnerDep) -> dict[str, Any]:
    row = owned_session(store, session_id, owner)
    out: dict[str, Any] = {"training_run_ids": store.models_of_session(session_id),
                           "sampler_ids": store.samplers_of_session(session_id)}
    if row.user_metadata:
        out["user_metadata"] = {str(k): str(v) for k, v in row.user_metadata.items()}
    if row.display_name:
        out["display_name"] = row.display_name
    return out
