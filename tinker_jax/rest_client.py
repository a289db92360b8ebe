"""In-process counterpart of the SDK's `RestClient` (`ServiceClient.create_rest_client()`): the training runs and
checkpoints of the local engine, read and managed as the SDK's types, so scripts and tinker-cookbook helpers
(`checkpoint_utils`: `get_training_run_by_tinker_path`, `delete_checkpoint_from_tinker_path`) run in process too.

The in-process caller is the machine's user: every run in the data directory is its own (API keys and their
scoping are the REST server's). There are no sessions or projects in process: `list_training_runs(project_id=...)`
lists none, and the session, billing and audit calls are left to the REST server. Runs and checkpoints read as the
server's JSON does (`engine.records`). Every call returns its future at once (calls that wait for a checkpoint's
turn run on a thread); a refusal is a ValueError (`tinker_jax.errors.UserError`, `NotFound`) raised by the future,
except where the SDK checks in the client and raises at the call (a malformed tinker path in the `*_by_tinker_path`,
`delete_checkpoint_from_tinker_path` and `get_external_weights_urls` calls; copy_weights without a project). The
engine's own TTL expiry runs in the in-process ServiceClient (`client.EXPIRE_EVERY_S`).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import tinker.types as tt

from tinker_jax.api_future import APIFuture, retrying
from tinker_jax.engine import records
from tinker_jax.engine.api import EngineAPI
from tinker_jax.engine.registry import KINDS, MAX_TTL_S, TinkerPath, check_name, new_run_id
from tinker_jax.errors import NotFound, UserError
from tinker_jax.futures import failed

Scope = Literal["owned", "accessible"]


def _run_not_found(run_id: str) -> NotFound:
    return NotFound(f"training_run_id: unknown training run {run_id!r}")


def _checkpoint_id_path(training_run_id: str, checkpoint_id: str) -> str:
    """The tinker path of a REST checkpoint address: `weights/<name>`, `sampler_weights/<name>` or
    `external_weights/<name>` under the run."""
    check_name(training_run_id, "training_run_id")
    if not isinstance(checkpoint_id, str) or checkpoint_id.split("/", 1)[0] not in KINDS:
        raise UserError(f"checkpoint_id: expected 'weights/<name>', 'sampler_weights/<name>' or "
                        f"'external_weights/<name>', got {checkpoint_id!r}")
    return str(TinkerPath.parse(f"tinker://{training_run_id}/{checkpoint_id}", "checkpoint_id"))


class RestClient:
    """Runs and checkpoints of the local engine, as `tinker.RestClient` has them. Every call returns an APIFuture
    (`.result()`, `await`); the deprecated `*_async` twins return the result."""

    def __init__(self, service: Any = None):  # a tinker_jax.ServiceClient
        if service is None:
            raise ValueError("service: in process a RestClient reads an engine: tinker_jax.RestClient(service_client), "
                             "or service_client.create_rest_client()")
        self.service = service

    @property
    def engine(self) -> EngineAPI:
        return self.service.engine

    # --------------------------------------------------------------------------------------------- reading
    def _run(self, run_id: str) -> dict:
        run = self.engine.get_run(run_id) if isinstance(run_id, str) else None
        if run is None:
            raise _run_not_found(run_id)
        return records.run_record(self.engine, run, own=True)

    def _checkpoint(self, tinker_path: str, field: str = "tinker_path") -> str:
        """The path of a checkpoint on record, else NotFound naming `field`. One past its TTL whose delete has not
        run yet still counts, as on the server: it can be deleted, or its TTL changed."""
        path = str(TinkerPath.parse(tinker_path, field))
        if self.engine.get_checkpoint(path) is None:
            raise NotFound(f"{field}: checkpoint {path} not found")
        return path

    def get_training_run(self, training_run_id: str, access_scope: Scope = "owned") -> APIFuture[tt.TrainingRun]:
        return _now(lambda: tt.TrainingRun.model_validate(self._run(training_run_id)))

    def get_training_run_by_tinker_path(self, tinker_path: str, access_scope: Scope = "owned"
                                        ) -> APIFuture[tt.TrainingRun]:
        run_id = TinkerPath.parse(tinker_path, "tinker_path").run_id  # raised at the call, as the SDK's parse
        return _now(lambda: tt.TrainingRun.model_validate(self._run(run_id)))

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> APIFuture[tt.WeightsInfoResponse]:
        def info():
            got = self.engine.weights_info(self._checkpoint(tinker_path))
            return tt.WeightsInfoResponse.model_validate({k: v for k, v in got.items() if v is not None})
        return _now(info)

    def list_training_runs(self, limit: int = 20, offset: int = 0, access_scope: Scope = "owned",
                           project_id: str | None = None) -> APIFuture[tt.TrainingRunsResponse]:
        def listing():
            _check_page(limit, offset)
            runs = [] if project_id is not None else self.engine.list_runs()  # no run is in a project here
            page, cursor = records.page(runs, offset, limit)
            return tt.TrainingRunsResponse.model_validate({
                "training_runs": [records.run_record(self.engine, r, own=True) for r in page],
                "cursor": cursor})
        return _now(listing)

    def list_checkpoints(self, training_run_id: str) -> APIFuture[tt.CheckpointsListResponse]:
        def listing():
            if not isinstance(training_run_id, str) or self.engine.get_run(training_run_id) is None:
                raise _run_not_found(training_run_id)
            return tt.CheckpointsListResponse.model_validate(
                records.checkpoint_listing(records.live(self.engine.list_checkpoints(training_run_id))))
        return _now(listing)

    def list_user_checkpoints(self, limit: int = 100, offset: int = 0) -> APIFuture[tt.CheckpointsListResponse]:
        def listing():
            _check_page(limit, offset)
            return tt.CheckpointsListResponse.model_validate(
                records.checkpoint_listing(records.live(self.engine.list_checkpoints()), offset, limit))
        return _now(listing)

    def get_external_weights_urls(self, tinker_path: str) -> APIFuture[tt.ExternalWeightsUrlsResponse]:
        """file:// URLs of an external_weights checkpoint's files (the Hugging Face files that
        `save_weights_external` wrote). They stay valid while the checkpoint exists: `expires` is the end of its TTL,
        or MAX_TTL_S from now when it has none."""
        if TinkerPath.parse(tinker_path, "tinker_path").kind != "external_weights":  # the SDK checks this at the call
            raise UserError(f"tinker_path: {tinker_path} is not an external_weights checkpoint (save one with "
                            "save_weights_external)")

        def urls():
            path = self._checkpoint(tinker_path)
            names = self.engine.checkpoint_files(path)
            info = self.engine.get_checkpoint(path)
            expires = info.expires if info is not None and info.expires is not None else time.time() + MAX_TTL_S
            return tt.ExternalWeightsUrlsResponse.model_validate({
                "urls": {n: self.engine.checkpoint_file(path, n).resolve().as_uri() for n in names},
                "expires": records.iso_time(expires)})
        return _now(urls)

    # --------------------------------------------------------------------------------------------- changing
    def _delete(self, path: str, field: str) -> APIFuture[None]:
        """On the checkpoint's turn on its path (after the saves and loads submitted before it)."""
        try:
            path = self._checkpoint(path, field)
            fut = retrying(lambda: self.engine.delete_checkpoint(path))
        except Exception as e:  # noqa: BLE001 - through the future, as the SDK's request would fail
            return APIFuture(failed(e))

        def gone(existed: bool) -> None:
            if not existed:  # a delete submitted before this one got there first
                raise NotFound(f"{field}: checkpoint {path} not found")

        return APIFuture(fut, gone)

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        try:
            path = _checkpoint_id_path(training_run_id, checkpoint_id)
        except ValueError as e:
            return APIFuture(failed(e))
        return self._delete(path, "checkpoint_id")

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        TinkerPath.parse(tinker_path, "tinker_path")  # raised at the call, as the SDK's parse
        return self._delete(tinker_path, "tinker_path")

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return _now(lambda: self.engine.set_checkpoint_public(self._checkpoint(tinker_path), True))

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        return _now(lambda: self.engine.set_checkpoint_public(self._checkpoint(tinker_path), False))

    def set_checkpoint_ttl_from_tinker_path(self, tinker_path: str, ttl_seconds: int | None) -> APIFuture[None]:
        return _now(lambda: self.engine.set_checkpoint_ttl(self._checkpoint(tinker_path), ttl_seconds))

    def copy_weights(self, path: str, destination_project_id: str | None = None, *, ttl_seconds: int | None = None,
                     weights_access_token: str | None = None) -> APIFuture[str]:
        """The checkpoint `path` under a new training run (same kind and name, the files shared: deleting either
        keeps the other loadable; the copy's run cannot be trained). As in the SDK a destination project is required
        (or TINKER_PROJECT_ID); in process there are no projects, so it is checked and not recorded."""
        if destination_project_id is None:
            destination_project_id = os.environ.get("TINKER_PROJECT_ID") or None
        if destination_project_id is None:
            raise ValueError("Provide destination_project_id or set TINKER_PROJECT_ID")  # the SDK's, raised now
        if not isinstance(destination_project_id, str) or not destination_project_id:
            return APIFuture(failed(UserError("destination_project_id: required (the project that will own the "
                                              f"copy), got {destination_project_id!r}")))

        def copy():
            source = self._checkpoint(path, "source_path")
            return self.engine.copy_checkpoint(source, new_run_id(), owner=None, ttl_seconds=ttl_seconds)
        return _now(copy)

    # ------------------------------------------------------------------------------ deprecated async twins
    async def get_training_run_async(self, training_run_id: str, access_scope: Scope = "owned") -> tt.TrainingRun:
        return await self.get_training_run(training_run_id, access_scope)

    async def get_training_run_by_tinker_path_async(self, tinker_path: str, access_scope: Scope = "owned"
                                                    ) -> tt.TrainingRun:
        return await self.get_training_run_by_tinker_path(tinker_path, access_scope)

    async def list_training_runs_async(self, limit: int = 20, offset: int = 0, access_scope: Scope = "owned",
                                       project_id: str | None = None) -> tt.TrainingRunsResponse:
        return await self.list_training_runs(limit, offset, access_scope, project_id)

    async def list_checkpoints_async(self, training_run_id: str) -> tt.CheckpointsListResponse:
        return await self.list_checkpoints(training_run_id)

    async def list_user_checkpoints_async(self, limit: int = 100, offset: int = 0) -> tt.CheckpointsListResponse:
        return await self.list_user_checkpoints(limit, offset)

    async def get_external_weights_urls_async(self, tinker_path: str) -> tt.ExternalWeightsUrlsResponse:
        return await self.get_external_weights_urls(tinker_path)

    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        return await self.delete_checkpoint(training_run_id, checkpoint_id)

    async def delete_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        return await self.delete_checkpoint_from_tinker_path(tinker_path)

    async def publish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        return await self.publish_checkpoint_from_tinker_path(tinker_path)

    async def unpublish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        return await self.unpublish_checkpoint_from_tinker_path(tinker_path)

    async def set_checkpoint_ttl_from_tinker_path_async(self, tinker_path: str, ttl_seconds: int | None) -> None:
        return await self.set_checkpoint_ttl_from_tinker_path(tinker_path, ttl_seconds)

    async def copy_weights_async(self, path: str, destination_project_id: str | None = None, *,
                                 ttl_seconds: int | None = None, weights_access_token: str | None = None) -> str:
        return await self.copy_weights(path, destination_project_id, ttl_seconds=ttl_seconds,
                                       weights_access_token=weights_access_token)


_CALLS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tinker-jax-rest")


def _now(call):
    """An APIFuture of `call()`, returned at once as the SDK's: publish, TTL, copies and file listings wait for the
    checkpoint's turn on its path (behind a save still writing it), so they run on a thread; any failure, a refusal
    or the server's fault, goes through the future."""
    return APIFuture(_CALLS.submit(call))


def _check_page(limit, offset) -> None:
    for field, v in (("limit", limit), ("offset", offset)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UserError(f"{field}: expected a whole number >= 0, got {v!r}")
