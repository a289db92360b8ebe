"""Checkpoints: the writes and loads (POST /save_weights, /save_weights_for_sampler, /save_weights_external,
/load_weights; wire doc §2.5), POST /weights_info, and the REST resources the SDK's RestClient and the `tinker`
CLI use (training runs, checkpoints, delete, publish, TTL; §2.7).

Tinker paths are `tinker://{run_id}/{weights|sampler_weights|external_weights}/{name}`; names are validated by the
registry (one path segment: no '/', no '..', no absolute paths). REST checkpoint ids contain a slash
(`weights/<name>`), so the generic `{checkpoint_id:path}` routes are declared after the `/publish`, `/ttl`,
`/archive` ones. Downloads (`/archive`, `/external_weights_urls`) hand out signed URLs that server.downloads serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from email.utils import formatdate
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import RedirectResponse
from tinker import types

from server import wire
from server.access import Caller, owned_model, owned_session, readable_checkpoint, sees, writable_checkpoint
from server.deps import CallerDep, EngineDep, FuturesDep, JsonBody, OwnerDep, SamplersDep, SettingsDep, StoreDep
from server.errors import ApiError
from server.lifecycle import delete_checkpoint
from server.downloads import ARCHIVE
from server.limits import check_metadata
from server.routes._submit import (check_base_model, check_optimizer_config, check_seq_id, forget_model_on_failure,
                                   record_new_model, train_key, untyped_future)
from server.routes.models import model_limit
from server.store import Store
from tinker_jax.engine import records
from tinker_jax.engine.api import CheckpointInfo, EngineAPI, RunInfo
from tinker_jax.engine.registry import check_name, check_ttl
from tinker_jax.errors import NotFound, UserError
from tinker_jax.futures import then

log = logging.getLogger(__name__)

router = APIRouter()

# --- saves and loads ---------------------------------------------------------------------------------------------


@router.post("/save_weights")
async def save_weights(body: JsonBody, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                       owner: OwnerDep, settings: SettingsDep) -> dict[str, Any]:
    req = wire.parse_request(types.SaveWeightsRequest, body)
    model = owned_model(store, req.model_id, owner)
    check_metadata(settings.max_metadata_bytes, user_metadata=req.user_metadata)  # stored with the checkpoint
    name = req.path or f"state-{uuid.uuid4().hex[:12]}"

    def start():
        check_name(name, "path")  # the engine checks it too, naming its own argument; the client sent "path"
        ttl = check_ttl(req.ttl_seconds)
        # overwrite=False and the name taken: a failed future, not a 409, which the SDK would retry for 5 minutes.
        return then(engine.save_state(req.model_id, name, ttl, req.user_metadata, overwrite=req.overwrite,
                                      tenant=model.session_id),
                    lambda r: {"path": r.path, "type": "save_weights"})

    request_id, _ = futures.submit("save_weights", start, owner=owner,
                                   idempotency=train_key(req.model_id, req.seq_id), model_id=req.model_id)
    return untyped_future(request_id, model_id=req.model_id)


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(body: JsonBody, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                                   samplers: SamplersDep, owner: OwnerDep, settings: SettingsDep) -> dict[str, Any]:
    """Named (`path`): a sampler checkpoint, answered with its tinker path. Ephemeral (`sampling_session_seq_id`,
    no path): a snapshot in memory, answered with a new sampling session's id and no path (§2.5)."""
    req = wire.parse_request(types.SaveWeightsForSamplerRequest, body)
    model = owned_model(store, req.model_id, owner)
    check_metadata(settings.max_metadata_bytes, user_metadata=req.user_metadata)
    check_seq_id(req.sampling_session_seq_id, "sampling_session_seq_id")
    ephemeral = req.path is None

    def finish(result: tuple[str | None, str]) -> dict[str, Any]:  # on the engine thread, after the save
        path, engine_id = result
        out: dict[str, Any] = {"type": "save_weights_for_sampler"}
        if path is not None:
            out["path"] = path
        if ephemeral or req.sampling_session_seq_id is not None:
            row = store.create_sampling_session(model.session_id, req.sampling_session_seq_id,
                                                base_model=engine.sampler_base_model(engine_id), model_path=path,
                                                model_id=req.model_id)
            samplers.bind(row, engine_id)
            out["sampling_session_id"] = row.sampling_session_id
        else:
            samplers.park(path, engine_id)  # the create_sampling_client(path) that usually follows reuses it
        return out

    def start():
        ttl = check_ttl(req.ttl_seconds)
        if not ephemeral:
            check_name(req.path, "path")
        return then(engine.save_weights_for_sampler(req.model_id, req.path, ttl, user_metadata=req.user_metadata,
                                                    tenant=model.session_id),
                    finish)

    request_id, _ = futures.submit("save_weights_for_sampler", start, owner=owner,
                                   idempotency=train_key(req.model_id, req.seq_id), model_id=req.model_id)
    return untyped_future(request_id, model_id=req.model_id)


@router.post("/save_weights_external")
async def save_weights_external(body: JsonBody, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                                owner: OwnerDep) -> dict[str, Any]:
    """The run's weights as Hugging Face files (PEFT adapter or merged model), tinker://<run>/external_weights/<name>,
    whose files `external_weights_urls` then hands out. Encryption to age recipients is not offered: refused, so
    that nobody believes their weights were encrypted."""
    req = wire.parse_request(types.SaveWeightsExternalRequest, body)
    model = owned_model(store, req.model_id, owner)

    def start():
        if req.age_encryption_recipients:
            raise UserError("age_encryption_recipients: encrypted exports are not supported by this server")
        name = check_name(req.path, "path")
        ttl = check_ttl(req.ttl_seconds)
        return then(engine.save_weights_external(req.model_id, name, ttl, tenant=model.session_id),
                    lambda r: {"path": r[0], "size_bytes": r[1], "type": "save_weights_external"})

    request_id, _ = futures.submit("save_weights_external", start, owner=owner,
                                   idempotency=train_key(req.model_id, req.seq_id), model_id=req.model_id)
    return untyped_future(request_id, model_id=req.model_id)


@router.post("/load_weights")
async def load_weights(body: JsonBody, engine: EngineDep, store: StoreDep, futures: FuturesDep,
                       caller: CallerDep, settings: SettingsDep) -> dict[str, Any]:
    """Legacy (`model_id` + `seq_id`): load into an existing model. Create-via-load (`session_id` +
    `model_seq_id`, SDK 0.24.1+ and the only resume path of 0.38): a new model `{session_id}:train:{model_seq_id}`
    configured like the checkpoint's run, then loaded; the caller owns it. A checkpoint the caller may not read
    fails the future as "not found", exactly like a missing one."""
    req = wire.parse_request(types.LoadWeightsRequest, body)
    owner = caller.owner

    def common_checks() -> None:
        check_optimizer_config(body.get("optimizer_config"))
        readable_checkpoint(engine, req.path, caller)

    if req.model_id is not None:
        model = owned_model(store, req.model_id, owner)

        def start_legacy():
            common_checks()
            return then(engine.load_state(req.model_id, req.path, optimizer=req.optimizer, tenant=model.session_id),
                        lambda r: _resumed(engine, store, req, req.model_id))

        request_id, _ = futures.submit("load_weights", start_legacy, owner=owner,
                                       idempotency=train_key(req.model_id, req.seq_id), model_id=req.model_id)
        return untyped_future(request_id, model_id=req.model_id)

    if req.session_id is None or req.model_seq_id is None:
        raise UserError("load_weights: give model_id (load into an existing model) or session_id and model_seq_id "
                        "(create a model from the checkpoint)")
    owned_session(store, req.session_id, owner, live=True)
    check_metadata(settings.max_metadata_bytes, user_metadata=req.user_metadata)  # stored with the new run
    check_seq_id(req.model_seq_id, "model_seq_id")
    model_id = store.model_id_for(req.session_id, req.model_seq_id)

    def start():  # only for a new (session_id, model_seq_id), as in create_model
        record_new_model(store, model_id, req.session_id, owner, model_limit(settings))  # else nothing kept
        return forget_model_on_failure(store, model_id, start_create)

    def start_create():
        common_checks()
        check_base_model(engine, req.base_model)
        # The new run carries the request's user_metadata (the cookbook stores its renderer name there on resume).
        return then(engine.create_model_from_state(req.path, req.optimizer, model_id=model_id,
                                                   base_model=req.base_model, user_metadata=req.user_metadata,
                                                   owner=owner, tenant=req.session_id,
                                                   optimizer_config=body.get("optimizer_config")),
                    lambda r: _resumed(engine, store, req, r.model_id))

    # Shares create_model's key: both consume the session's model_seq_id.
    request_id, _ = futures.submit("load_weights", start, owner=owner,
                                   idempotency=("create_model", req.session_id, req.model_seq_id),
                                   session_id=req.session_id, model_id=model_id)
    return untyped_future(request_id, model_id=model_id)


def _resumed(engine: EngineAPI, store: Store, req: types.LoadWeightsRequest, model_id: str) -> dict[str, Any]:
    """load_weights' answer; with the optimizer state, the console's step count goes on from the checkpoint's."""
    if req.optimizer:
        try:
            info = engine.get_checkpoint(req.path)
            store.mark_step(model_id, (info.step or 0) if info is not None else 0)
        except Exception:  # noqa: BLE001 - the console's record, not the user's result
            log.exception("recording the resumed step of %s failed", model_id)
    return {"path": req.path, "model_id": model_id, "type": "load_weights"}


@router.post("/copy_weights")
def copy_weights(body: JsonBody, engine: EngineDep, store: StoreDep, caller: CallerDep,
                 settings: SettingsDep) -> dict[str, Any]:
    """SDK copy_weights (synchronous): a checkpoint the caller may read, copied into `destination_project_id` under a
    new training run of a new (finished) session of the caller there: same kind and name, the source's files shared
    (hard links), so deleting either keeps the other loadable. The copy's run cannot be trained."""
    req = wire.parse_request(types.CopyWeightsRequest, body)
    source = str(readable_checkpoint(engine, req.source_path, caller, "source_path"))
    if not engine.checkpoint_files(source):  # before a session is made for the copy
        raise ApiError(404, f"source_path: checkpoint {source} not found")
    project = req.destination_project_id
    if not project:
        raise UserError("destination_project_id: required (the project that will own the copy)")
    check_metadata(settings.max_metadata_bytes, destination_project_id=project)
    ttl = check_ttl(req.ttl_seconds)
    sid = store.create_session(owner=caller.owner, tags=["copy_weights"], project_id=project,
                               display_name=f"copy of {source}")
    store.finish_session(sid, "success", "holds a copy of weights")  # nothing runs in it
    run_id = store.model_id_for(sid, 0)
    store.add_model(run_id, sid, caller.owner)
    try:
        path = engine.copy_checkpoint(source, run_id, owner=caller.owner, ttl_seconds=ttl)
    except BaseException:
        store.remove_model(run_id)
        raise
    return {"tinker_path": path}


@router.post("/weights_info")
async def weights_info(body: JsonBody, engine: EngineDep, caller: CallerDep) -> dict[str, Any]:
    path = body.get("tinker_path")
    readable_checkpoint(engine, path, caller, "tinker_path")
    info = await asyncio.to_thread(engine.weights_info, path)
    return {k: v for k, v in info.items() if v is not None}


# --- REST: training runs and checkpoints -------------------------------------------------------------------------
# Plain `def` routes: FastAPI runs them in its thread pool, so the engine's registry reads never stall the event loop.


def _listable(request: Request, ckpts: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """SDKs before 0.28 know only the checkpoint types training and sampler, and fail to parse a listing with an
    external one: theirs leave external_weights checkpoints out (the SDK names its version in a header)."""
    version = request.headers.get("x-stainless-package-version", "")
    parts = version.split(".")
    if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit() and (int(parts[0]), int(parts[1])) < (0, 28):
        return [c for c in ckpts if c.kind != "external_weights"]
    return ckpts


def training_run_json(engine: EngineAPI, run: RunInfo, caller: Caller) -> dict[str, Any]:
    """A run as the caller may see it: their own (`access.sees`) in full, another key's (or, with API keys, an
    ownerless one) listed because it published a checkpoint, through those only (`records.training_run_record`)."""
    return records.run_record(engine, run, sees(run, caller))


Scope = Literal["owned", "accessible"]


def _visible(engine: EngineAPI, run: RunInfo, caller: Caller, access_scope: Scope) -> bool:
    """The caller's (`access.sees`: an ownerless run only without API keys); with access_scope=accessible, also a
    run that published a checkpoint."""
    return sees(run, caller) or (access_scope == "accessible" and
                                any(c.public for c in engine.list_checkpoints(run.run_id)))


def _visible_run(engine: EngineAPI, run_id: str, caller: Caller, access_scope: Scope) -> RunInfo:
    run = engine.get_run(run_id)
    if run is None or not _visible(engine, run, caller, access_scope):
        raise ApiError(404, f"unknown training run {run_id!r}")
    return run


@router.get("/training_runs")
def list_training_runs(engine: EngineDep, store: StoreDep, caller: CallerDep,
                       limit: Annotated[int, Query(ge=0, le=10_000)] = 20, offset: Annotated[int, Query(ge=0)] = 0,
                       access_scope: Scope = "owned", project_id: str | None = None) -> dict[str, Any]:
    """project_id: only runs made in a session of that project (`ServiceClient(project_id=...)`, or moved there by
    `assign_session_project`)."""
    visible = [r for r in engine.list_runs() if _visible(engine, r, caller, access_scope)
               and (project_id is None or store.project_of_model(r.run_id) == project_id)]  # newest first
    page, cursor = records.page(visible, offset, limit)
    return {"training_runs": [training_run_json(engine, r, caller) for r in page], "cursor": cursor}


@router.get("/training_runs/{run_id}")
def get_training_run(run_id: str, engine: EngineDep, caller: CallerDep,
                     access_scope: Scope = "owned") -> dict[str, Any]:
    return training_run_json(engine, _visible_run(engine, run_id, caller, access_scope), caller)


@router.get("/training_runs/{run_id}/checkpoints")
def list_run_checkpoints(run_id: str, request: Request, engine: EngineDep, caller: CallerDep) -> dict[str, Any]:
    run = _visible_run(engine, run_id, caller, "accessible")
    ckpts = _listable(request, records.live(engine.list_checkpoints(run_id)))
    if not sees(run, caller):  # someone else's run: only what they published
        ckpts = [c for c in ckpts if c.public]
    return records.checkpoint_listing(ckpts)


@router.get("/checkpoints")
def list_user_checkpoints(request: Request, engine: EngineDep, caller: CallerDep,
                          limit: Annotated[int, Query(ge=0, le=10_000)] = 100,
                          offset: Annotated[int, Query(ge=0)] = 0) -> dict[str, Any]:
    runs = {r.run_id: r for r in engine.list_runs()}
    ckpts = [c for c in _listable(request, records.live(engine.list_checkpoints()))
             if sees(runs.get(c.run_id), caller)]  # newest first
    return records.checkpoint_listing(ckpts, offset, limit)


CheckpointType = Annotated[str | None, Query(pattern="^(training|sampler|external)$")]


@router.post("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish", status_code=204)
def publish_checkpoint(run_id: str, checkpoint_id: str, engine: EngineDep, caller: CallerDep,
                       checkpoint_type: CheckpointType = None) -> Response:
    engine.set_checkpoint_public(writable_checkpoint(engine, run_id, checkpoint_id, caller, checkpoint_type), True)
    return Response(status_code=204)


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish", status_code=204)
def unpublish_checkpoint(run_id: str, checkpoint_id: str, engine: EngineDep, caller: CallerDep,
                         checkpoint_type: CheckpointType = None) -> Response:
    engine.set_checkpoint_public(writable_checkpoint(engine, run_id, checkpoint_id, caller, checkpoint_type), False)
    return Response(status_code=204)


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl", status_code=204)
def set_checkpoint_ttl(run_id: str, checkpoint_id: str, body: JsonBody, engine: EngineDep, caller: CallerDep,
                       checkpoint_type: CheckpointType = None) -> Response:
    path = writable_checkpoint(engine, run_id, checkpoint_id, caller, checkpoint_type)
    engine.set_checkpoint_ttl(path, check_ttl(body.get("ttl_seconds")))
    return Response(status_code=204)


def _readable(engine: EngineAPI, run_id: str, checkpoint_id: str, caller: Caller) -> str:
    """The tinker path of a REST checkpoint address the caller may read (its own, or published), else 404."""
    path = f"tinker://{run_id}/{checkpoint_id}"
    try:
        return str(readable_checkpoint(engine, path, caller, "checkpoint"))
    except NotFound:
        raise ApiError(404, f"checkpoint {path} not found") from None


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/archive")
def checkpoint_archive(run_id: str, checkpoint_id: str, request: Request, engine: EngineDep,
                       caller: CallerDep) -> Response:
    """SDK <= 0.34's download: a 302 to a signed URL of a tar of the checkpoint's files (server.downloads)."""
    path = _readable(engine, run_id, checkpoint_id, caller)
    url, expires = request.app.state.signer.url(str(request.base_url), path, ARCHIVE)
    return RedirectResponse(url, status_code=302, headers={"Expires": formatdate(expires, usegmt=True)})


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
def external_weights_urls(run_id: str, checkpoint_id: str, request: Request, engine: EngineDep,
                          caller: CallerDep) -> dict[str, Any]:
    """Per-file signed URLs of an external_weights checkpoint (`tinker checkpoint download` fetches them)."""
    path = _readable(engine, run_id, checkpoint_id, caller)
    if not checkpoint_id.startswith("external_weights/"):
        raise UserError(f"checkpoint_id: {checkpoint_id!r} is not an external_weights checkpoint (save one with "
                        "save_weights_external; `tinker checkpoint download` does that for you)")
    try:
        files = engine.checkpoint_files(path)
    except NotFound:
        raise ApiError(404, f"checkpoint {path} not found") from None
    signer, now = request.app.state.signer, time.time()
    urls = {name: signer.url(str(request.base_url), path, name, now)[0] for name in files}
    return {"urls": urls, "expires": wire.iso_time(now + signer.ttl_s)}


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}", status_code=204)
def delete_checkpoint_route(run_id: str, checkpoint_id: str, engine: EngineDep, samplers: SamplersDep,
                            caller: CallerDep, checkpoint_type: CheckpointType = None) -> Response:
    path = writable_checkpoint(engine, run_id, checkpoint_id, caller, checkpoint_type)
    # Waits (on this pool thread) for the requests already submitted on the path, e.g. a save still writing it.
    if not delete_checkpoint(engine, samplers, path, caller.owner):
        raise ApiError(404, f"checkpoint {path} not found")  # a concurrent delete got there first
    return Response(status_code=204)
