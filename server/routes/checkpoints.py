"""Checkpoints: the writes and loads (POST /save_weights, /save_weights_for_sampler, /save_weights_external,
/load_weights; wire doc §2.5), POST /weights_info, and the REST resources the SDK's RestClient and the `tinker`
CLI use (training runs, checkpoints, delete, publish, TTL; §2.7).

Tinker paths are `tinker://{run_id}/{weights|sampler_weights}/{name}`; names are validated by the registry (one
path segment: no '/', no '..', no absolute paths). REST checkpoint ids contain a slash (`weights/<name>`), so the
generic `{checkpoint_id:path}` routes are declared after the `/publish`, `/ttl`, `/archive` ones.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from tinker import types

from server import wire
from server.access import (can_see_run, owned_model, owned_session, readable_checkpoint, run_owner,
                           writable_checkpoint)
from server.deps import EngineDep, FuturesDep, JsonBody, OwnerDep, SamplersDep, StoreDep
from server.errors import ApiError
from server.futures import then
from server.lifecycle import delete_checkpoint
from server.routes._submit import check_base_model, check_optimizer_config, check_seq_id, untyped_future
from server.store import Store
from tinker_jax.engine.registry import KINDS, TinkerPath, check_name

router = APIRouter()

MAX_TTL_S = 10 * 365 * 24 * 3600  # the SDK documents "1 hour to 10 years"; shorter TTLs are allowed here


def _check_ttl(ttl: Any, field: str = "ttl_seconds") -> int | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= MAX_TTL_S:
        raise ValueError(f"{field}: must be a whole number of seconds in (0, {MAX_TTL_S}], got {ttl!r}")
    return ttl


def _train_key(model_id: str, seq_id: int | None) -> tuple[str, str, int] | None:
    return None if seq_id is None else ("train", model_id, seq_id)


# --- saves and loads ---------------------------------------------------------------------------------------------


@router.post("/save_weights")
async def save_weights(body: JsonBody, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                       samplers: SamplersDep, owner: OwnerDep) -> dict[str, Any]:
    req = wire.parse_request(types.SaveWeightsRequest, body)
    owned_model(store, req.model_id, owner)
    name = req.path or f"state-{uuid.uuid4().hex[:12]}"

    def start():
        p = TinkerPath(req.model_id, "weights", check_name(name, "path"))
        ttl = _check_ttl(req.ttl_seconds)
        if not req.overwrite and engine.registry.get_checkpoint(p) is not None:
            # A failed future, not a 409: the SDK would retry a 409 for five minutes (§1.6).
            raise ValueError(f"path: checkpoint {p} already exists (save under another name, or overwrite=True)")
        samplers.unpark(str(p))
        return then(engine.save_state(req.model_id, name, ttl, req.user_metadata),
                    lambda r: {"path": r.path, "type": "save_weights"})

    request_id, _ = futures.submit("save_weights", start, idempotency=_train_key(req.model_id, req.seq_id),
                                   model_id=req.model_id)
    return untyped_future(request_id, model_id=req.model_id)


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(body: JsonBody, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                                   samplers: SamplersDep, owner: OwnerDep) -> dict[str, Any]:
    """Named (`path`): a sampler checkpoint, answered with its tinker path. Ephemeral (`sampling_session_seq_id`,
    no path): a snapshot in memory, answered with a new sampling session's id and no path (§2.5)."""
    req = wire.parse_request(types.SaveWeightsForSamplerRequest, body)
    model = owned_model(store, req.model_id, owner)
    ephemeral = req.path is None

    def finish(result: tuple[str | None, str]) -> dict[str, Any]:  # on the engine thread, after the save
        path, engine_id = result
        out: dict[str, Any] = {"type": "save_weights_for_sampler"}
        if path is not None:
            out["path"] = path
        if ephemeral or req.sampling_session_seq_id is not None:
            run = engine.registry.get_run(req.model_id) or {}
            row = store.create_sampling_session(model.session_id, req.sampling_session_seq_id,
                                                base_model=run.get("base_model"), model_path=path,
                                                model_id=req.model_id)
            samplers.bind(row, engine_id)
            out["sampling_session_id"] = row.sampling_session_id
        else:
            samplers.park(path, engine_id)  # the create_sampling_client(path) that usually follows reuses it
        return out

    def start():
        ttl = _check_ttl(req.ttl_seconds)
        if not ephemeral:
            check_name(req.path, "path")
        return then(engine.save_weights_for_sampler(req.model_id, req.path, ttl, user_metadata=req.user_metadata),
                    finish)

    request_id, _ = futures.submit("save_weights_for_sampler", start,
                                   idempotency=_train_key(req.model_id, req.seq_id), model_id=req.model_id)
    return untyped_future(request_id, model_id=req.model_id)


@router.post("/save_weights_external")
async def save_weights_external(body: JsonBody, store: StoreDep, futures: FuturesDep,
                                owner: OwnerDep) -> dict[str, Any]:
    model_id = body.get("model_id")
    owned_model(store, model_id, owner)
    seq_id = check_seq_id(body.get("seq_id"))

    def start():
        raise ValueError("save_weights_external: exporting Hugging Face weights is not supported by this server; "
                         "use save_state / save_weights_for_sampler, or `tinker-jax` export tools")

    request_id, _ = futures.submit("save_weights_external", start, idempotency=_train_key(model_id, seq_id),
                                   model_id=model_id)
    return untyped_future(request_id, model_id=model_id)


@router.post("/load_weights")
async def load_weights(body: JsonBody, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                       owner: OwnerDep) -> dict[str, Any]:
    """Legacy (`model_id` + `seq_id`): load into an existing model. Create-via-load (`session_id` +
    `model_seq_id`, SDK 0.24.1+ and the only resume path of 0.38): a new model `{session_id}:train:{model_seq_id}`
    configured like the checkpoint's run, then loaded."""
    req = wire.parse_request(types.LoadWeightsRequest, body)

    def common_checks() -> None:
        check_optimizer_config(body.get("optimizer_config"))
        readable_checkpoint(engine, store, req.path, owner)

    if req.model_id is not None:
        owned_model(store, req.model_id, owner)

        def start_legacy():
            common_checks()
            return then(engine.load_state(req.model_id, req.path, optimizer=req.optimizer),
                        lambda r: {"path": req.path, "model_id": req.model_id, "type": "load_weights"})

        request_id, _ = futures.submit("load_weights", start_legacy, idempotency=_train_key(req.model_id, req.seq_id),
                                       model_id=req.model_id)
        return untyped_future(request_id, model_id=req.model_id)

    if req.session_id is None or req.model_seq_id is None:
        raise ValueError("load_weights: give model_id (load into an existing model) or session_id and model_seq_id "
                         "(create a model from the checkpoint)")
    owned_session(store, req.session_id, owner, live=True)
    model_id = store.model_id_for(req.session_id, req.model_seq_id)
    store.add_model(model_id, req.session_id, owner)

    def start_create():
        common_checks()
        check_base_model(engine, req.base_model)
        # The new run carries the request's user_metadata (the cookbook stores its renderer name there on resume).
        extra = {"user_metadata": req.user_metadata} if req.user_metadata else {}
        return then(engine.create_model_from_state(req.path, req.optimizer, model_id=model_id,
                                                   base_model=req.base_model, **extra),
                    lambda r: {"path": req.path, "model_id": r.model_id, "type": "load_weights"})

    # Shares create_model's key: both consume the session's model_seq_id.
    request_id, _ = futures.submit("load_weights", start_create,
                                   idempotency=("create_model", req.session_id, req.model_seq_id),
                                   session_id=req.session_id, model_id=model_id)
    return untyped_future(request_id, model_id=model_id)


@router.post("/weights_info")
async def weights_info(body: JsonBody, engine: EngineDep, store: StoreDep, owner: OwnerDep) -> dict[str, Any]:
    path = body.get("tinker_path")
    readable_checkpoint(engine, store, path, owner, "tinker_path")
    info = await asyncio.to_thread(engine.weights_info, path)
    return {k: v for k, v in info.items() if v is not None}


# --- REST: training runs and checkpoints -------------------------------------------------------------------------


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def _str_dict(raw: Any) -> dict[str, str] | None:
    """user_metadata is dict[str, str] on the wire (TrainingRun/Checkpoint); stored JSON may hold anything."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return None
    if not isinstance(raw, dict) or not raw:
        return None
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}


def checkpoint_json(row: dict[str, Any]) -> dict[str, Any]:
    p = TinkerPath(row["run_id"], row["kind"], row["name"])
    return {
        "checkpoint_id": f"{p.kind}/{p.name}",
        "checkpoint_type": KINDS[p.kind],
        "time": _iso(row["created"]),
        "tinker_path": str(p),
        "size_bytes": row.get("size_bytes"),
        "public": bool(row.get("public")),
        "user_metadata": _str_dict(row.get("user_metadata")),
        "expires_at": _iso(row.get("expires")),
    }


def _live(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    now = time.time()
    return [r for r in rows if r.get("expires") is None or r["expires"] > now]


def training_run_json(engine: Any, store: Store, run: dict[str, Any], owners: dict[str, str]) -> dict[str, Any]:
    ckpts = _live(engine.registry.list_checkpoints(run["run_id"]))
    latest = {kind: max((c for c in ckpts if c["kind"] == kind), key=lambda c: c["created"], default=None)
              for kind in KINDS}
    return {
        "training_run_id": run["run_id"],
        "base_model": run["base_model"],
        "model_owner": run_owner(store, run["run_id"], owners) or "local",
        "is_lora": not run.get("full_finetune"),
        "corrupted": False,
        "lora_rank": run.get("lora_rank"),
        "last_request_time": _iso(run.get("last_request") or run["created"]),
        "last_checkpoint": None if latest["weights"] is None else checkpoint_json(latest["weights"]),
        "last_sampler_checkpoint": None if latest["sampler_weights"] is None else
        checkpoint_json(latest["sampler_weights"]),
        "user_metadata": _str_dict(run.get("user_metadata")),
    }


def _has_public_checkpoint(engine: Any, run_id: str) -> bool:
    return any(c.get("public") for c in engine.registry.list_checkpoints(run_id))


def _visible_run(engine: Any, store: Store, run_id: str, owner: str, access_scope: str) -> dict[str, Any]:
    run = engine.registry.get_run(run_id)
    if run is None or not (can_see_run(store, run_id, owner) or
                           (access_scope == "accessible" and _has_public_checkpoint(engine, run_id))):
        raise ApiError(404, f"unknown training run {run_id!r}")
    return run


Scope = Literal["owned", "accessible"]


@router.get("/training_runs")
def list_training_runs(engine: EngineDep, store: StoreDep, owner: OwnerDep,
                       limit: Annotated[int, Query(ge=0, le=10_000)] = 20, offset: Annotated[int, Query(ge=0)] = 0,
                       access_scope: Scope = "owned", project_id: str | None = None) -> dict[str, Any]:
    # A plain `def`: FastAPI runs it in its thread pool, so registry reads never stall the event loop.
    owners = store.model_owners()
    runs, _ = engine.registry.list_runs(limit=-1, offset=0)  # newest first; filtered here (runs are few)
    visible = [r for r in runs if can_see_run(store, r["run_id"], owner, owners) or
               (access_scope == "accessible" and _has_public_checkpoint(engine, r["run_id"]))]
    page = visible[offset:offset + limit]
    return {"training_runs": [training_run_json(engine, store, r, owners) for r in page],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(visible)}}


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: str, engine: EngineDep, store: StoreDep, owner: OwnerDep,
                     access_scope: Scope = "owned") -> dict[str, Any]:
    run = _visible_run(engine, store, run_id, owner, access_scope)
    return training_run_json(engine, store, run, store.model_owners())


@router.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(run_id: str, engine: EngineDep, store: StoreDep, owner: OwnerDep) -> dict[str, Any]:
    _visible_run(engine, store, run_id, owner, "accessible")
    rows = _live(engine.registry.list_checkpoints(run_id))
    if not can_see_run(store, run_id, owner):  # someone else's run: only what they published
        rows = [r for r in rows if r.get("public")]
    return {"checkpoints": [checkpoint_json(r) for r in rows],
            "cursor": {"offset": 0, "limit": len(rows), "total_count": len(rows)}}


@router.get("/checkpoints")
def list_user_checkpoints(engine: EngineDep, store: StoreDep, owner: OwnerDep,
                          limit: Annotated[int, Query(ge=0, le=10_000)] = 100,
                          offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
    owners = store.model_owners()
    rows = [r for r in _live(engine.registry.list_checkpoints(None, limit=-1, offset=0))
            if can_see_run(store, r["run_id"], owner, owners)]  # newest first
    return {"checkpoints": [checkpoint_json(r) for r in rows[offset:offset + limit]],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(rows)}}


CheckpointType = Annotated[str | None, Query(pattern="^(training|sampler)$")]


@router.post("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish", status_code=204)
def publish_checkpoint(run_id: str, checkpoint_id: str, engine: EngineDep, store: StoreDep, owner: OwnerDep,
                       checkpoint_type: CheckpointType = None) -> Response:
    p = writable_checkpoint(engine, store, run_id, checkpoint_id, owner, checkpoint_type)
    engine.registry.set_checkpoint(p, public=1)
    return Response(status_code=204)


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish", status_code=204)
def unpublish_checkpoint(run_id: str, checkpoint_id: str, engine: EngineDep, store: StoreDep, owner: OwnerDep,
                         checkpoint_type: CheckpointType = None) -> Response:
    p = writable_checkpoint(engine, store, run_id, checkpoint_id, owner, checkpoint_type)
    engine.registry.set_checkpoint(p, public=0)
    return Response(status_code=204)


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl", status_code=204)
def set_checkpoint_ttl(run_id: str, checkpoint_id: str, body: JsonBody, engine: EngineDep, store: StoreDep,
                       owner: OwnerDep, checkpoint_type: CheckpointType = None) -> Response:
    p = writable_checkpoint(engine, store, run_id, checkpoint_id, owner, checkpoint_type)
    ttl = _check_ttl(body.get("ttl_seconds"))
    engine.registry.set_checkpoint(p, expires=None if ttl is None else time.time() + ttl)
    return Response(status_code=204)


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/archive")
def checkpoint_archive(run_id: str, checkpoint_id: str, engine: EngineDep, store: StoreDep,
                       owner: OwnerDep) -> Response:
    writable_checkpoint(engine, store, run_id, checkpoint_id, owner)
    raise ApiError(404, "checkpoint downloads are not served by this server; the files are under the server's "
                        "data directory (checkpoints/{run_id}/{kind}/{name})")


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
def external_weights_urls(run_id: str, checkpoint_id: str) -> Response:
    raise ApiError(404, "external (Hugging Face) weights are not supported by this server")


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", status_code=204)
def delete_checkpoint_route(run_id: str, checkpoint_id: str, engine: EngineDep, store: StoreDep,
                            samplers: SamplersDep, owner: OwnerDep,
                            checkpoint_type: CheckpointType = None) -> Response:
    p = writable_checkpoint(engine, store, run_id, checkpoint_id, owner, checkpoint_type)
    delete_checkpoint(engine, samplers, p)
    return Response(status_code=204)
