"""Usage and audit (wire doc §2.8; AdminClient, `tinker billing ...`):

- GET /billing/usage/checkpoints/current: the checkpoint storage of the caller's key, one item: the checkpoints of
  the runs it owns, counted by the engine (`EngineAPI.storage_usage`); `project_id` narrows it to the runs made in
  that project's sessions.
- GET /billing/usage/events: this server bills nothing, so no events and no sessions: an honest, empty answer in
  the SDK's shape (the call and the CLI work).
- GET /audit: who did what, from the caller's requests still on record (futures are kept future_ttl_s) and the
  creation of its checkpoints; `event_type` checkpoints keeps the latter only (projects, teams and organisations
  have no events here); `day` (YYYY-MM-DD, UTC) narrows to one day.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter

from server import wire
from server.access import sees
from server.deps import CallerDep, EngineDep, OwnerDep, StoreDep
from tinker_jax.errors import UserError

router = APIRouter()

GIGABYTE = 10**9  # the storage billing unit of the SDK's size_gigabytes


@router.get("/billing/usage/checkpoints/current")
def current_checkpoint_storage(engine: EngineDep, store: StoreDep, owner: OwnerDep,
                               project_id: str | None = None) -> dict[str, Any]:
    if project_id is None:
        count, size = engine.storage_usage(owner)
    else:
        runs = {r.run_id for r in engine.list_runs() if r.owner == owner and store.project_of_model(r.run_id) ==
                project_id}
        sizes = [c.size_bytes or 0 for c in engine.list_checkpoints() if c.run_id in runs]
        count, size = len(sizes), sum(sizes)
    return {"data": [{"checkpoint_count": int(count), "size_bytes": int(size), "size_gigabytes": size / GIGABYTE}]}


@router.get("/billing/usage/events")
async def billing_usage_events(owner: OwnerDep, starting_on: str | None = None,
                               ending_before: str | None = None) -> dict[str, Any]:
    return {"data": [], "sessions": {}, "cost_data_through": None}


@router.get("/audit")
def audit_log(engine: EngineDep, store: StoreDep, caller: CallerDep, event_type: str = "all",
              day: str | None = None) -> dict[str, Any]:
    if event_type not in ("all", "checkpoints", "projects", "teams", "organizations"):
        raise UserError(f"event_type: expected all, checkpoints, projects, teams or organizations, got {event_type!r}")
    since, until = 0.0, None
    if day is not None:
        try:
            start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            raise UserError(f"day: expected YYYY-MM-DD, got {day!r}") from None
        since, until = start, start + 86400
    entries: list[dict[str, Any]] = []
    if event_type in ("all", "checkpoints"):
        runs = {r.run_id: r for r in engine.list_runs()}
        for c in engine.list_checkpoints():
            if sees(runs.get(c.run_id), caller) and since <= c.created < (until or float("inf")):
                entries.append({"timestamp": wire.iso_time(c.created), "event": "checkpoint_created",
                                "event_details": {"checkpoint_type": c.kind, "size_bytes": c.size_bytes},
                                "model_id": c.run_id, "tinker_path": c.path, "purpose": None})
    if event_type == "all":
        for r in store.requests_of(caller.owner, since, until):
            entries.append({"timestamp": wire.iso_time(r["created"]), "event": r["kind"],
                            "event_details": {"status": r["status"], "session_id": r["session_id"],
                                              "sampling_session_id": r["sampling_session_id"]},
                            "model_id": r["model_id"], "tinker_path": None, "purpose": None})
    entries.sort(key=lambda e: e["timestamp"], reverse=True)
    return {"entries": entries}
