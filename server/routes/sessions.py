"""Sessions: POST /create_session, /session_heartbeat, /sessions/{session_id}/finish (wire doc §2.2), and the REST
reads GET /sessions, GET /sessions/{session_id}."""

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
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


CLIENT_REASONS = ("success", "errored", "interrupted")  # what the SDK's SessionStatus allows


def _status(row) -> dict[str, Any]:
    if row.finished is None:
        return {"type": "active"}
    # "expired" (no heartbeat) and "unspecified" are this server's own reasons: the client stopped without saying.
    reason = row.finish_reason if row.finish_reason in CLIENT_REASONS else "interrupted"
    return {"type": "client_finished", "reason": {"type": reason}}


def _matches(row, req: types.SessionSearchRequest) -> bool:
    """The request's filters (SDK SessionSearchRequest): session_id or display_name (either may match; every
    word of display_name, anywhere in the name, case-insensitive), projects, every user_metadata pair, statuses."""
    if req.session_id or req.display_name:
        by_id = bool(req.session_id) and row.session_id == req.session_id
        name = (row.display_name or "").lower()
        by_name = bool(req.display_name) and all(w in name for w in req.display_name.lower().split())
        if not (by_id or by_name):
            return False
    if req.project_ids and row.project_id not in req.project_ids:
        return False
    meta = {str(k): str(v) for k, v in (row.user_metadata or {}).items()}
    if any(meta.get(k) != v for k, v in (req.user_metadata or {}).items()):
        return False
    if req.statuses:
        status = _status(row)
        for q in req.statuses:
            if q.type == status["type"] and (q.type != "client_finished" or not q.reasons
                                            or status["reason"]["type"] in q.reasons):
                break
        else:
            return False
    return True


@router.post("/sessions/search")  # declared before /sessions/{session_id}, whose GET would otherwise answer 405
def search_sessions(body: JsonBody, store: StoreDep, owner: OwnerDep, engine: EngineDep) -> dict[str, Any]:
    """The caller's sessions matching the request (`_matches`), newest first by (created, session id), `limit` at a
    time; the cursor is the last one's (created, session id), compared at its microsecond precision. Only the
    caller's own: with owner "accessible" or other users' URNs too, since a key sees no one else's."""
    req = wire.parse_request(types.SessionSearchRequest, body)
    rows = sorted(store.sessions_of(owner, limit=10_000), key=lambda r: (_micros(r.created), r.session_id),
                  reverse=True)
    if req.cursor is not None:
        after = (_micros(req.cursor.last_created_at), req.cursor.last_session_id)
        rows = [r for r in rows if (_micros(r.created), r.session_id) < after]
    rows = [r for r in rows if _matches(r, req)][:req.limit]
    ckpts = engine.list_checkpoints()
    out = []
    for row in rows:
        runs = set(store.models_of_session(row.session_id))
        sizes = [c.size_bytes or 0 for c in ckpts if c.run_id in runs]
        meta = {str(k): str(v) for k, v in (row.user_metadata or {}).items()}
        out.append({"session_id": row.session_id, "created_at": wire.iso_time(row.created), "owner": owner,
                    "project_id": row.project_id or "", "status": _status(row), "checkpoints_count": len(sizes),
                    "checkpoint_storage_bytes": sum(sizes), "display_name": row.display_name,
                    "user_metadata": meta or None})
    last = out[-1] if len(out) == req.limit else None
    return {"sessions": out, "next_cursor": None if last is None else
            {"last_created_at": last["created_at"], "last_session_id": last["session_id"]}}


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _micros(when: float | datetime) -> int:
    """A time as whole microseconds since the epoch: exactly what its ISO 8601 form on the wire says (a float time
    goes through the same datetime conversion `_iso` makes), so a cursor compares equal to the row it came from."""
    dt = when if isinstance(when, datetime) else datetime.fromtimestamp(when, timezone.utc)
    return (dt - EPOCH) // timedelta(microseconds=1)


@router.put("/sessions/{session_id}/project")
async def assign_session_project(session_id: str, body: JsonBody, store: StoreDep, owner: OwnerDep) -> dict:
    """Move one of the caller's sessions (and so its training runs) into a project. Projects are names this
    server keeps with sessions; a session cannot be taken out of one (as the SDK documents)."""
    owned_session(store, session_id, owner)
    project = body.get("project_id")
    if not isinstance(project, str) or not project:
        raise UserError("project_id: must be a non-empty string")
    check_metadata(256, project_id=project)
    store.set_session_project(session_id, project)
    return {}


@router.get("/sessions/{session_id}/trace_export")
def export_session_trace(session_id: str, request: Request, store: StoreDep, owner: OwnerDep) -> dict[str, Any]:
    """The session's timeline (SDK `export_session_trace`, `tinker session export-trace`): ready at once, as a signed
    URL of a JSON trace (Trace Event Format: ui.perfetto.dev opens it) built from its requests still on record."""
    owned_session(store, session_id, owner)
    return {"status": "ready", "url": request.app.state.signer.trace_url(str(request.base_url), session_id)}


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
