"""The engine: one core behind both front doors (tinker_jax.ServiceClient and the REST server).

A request's path (DESIGN.md has the diagram):
  front door -> Engine method (validate: a UserError fails the future before any device work; bounds: Overloaded)
  -> typed Request appended to its base model's log (BaseWorker.submit -> engine.scheduler)
  -> the worker's next round batches it with other runs' requests -> jitted step on the device
  -> the result is split per request and its future resolved.
Each base model has its own log and worker thread (engine.worker), so loading one model or writing a checkpoint
never stalls another model; nothing here holds a lock across I/O or compilation (the lock guards small dicts).
Samples go straight to the base model's sampler (continuous batching), which the same worker drives.
"""

from __future__ import annotations

import collections
import itertools
import logging
import secrets
import threading
import time
import uuid
import weakref
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import tinker.types as tt

from tinker_jax import atomic, datadir, distributed
from tinker_jax.config import EngineConfig
from tinker_jax.engine import checkpoints, files, index, replicas, requests as rq, stability
from tinker_jax.engine.api import CheckpointInfo, EngineAPI, RunInfo
from tinker_jax.engine.quota import CheckpointQuota
from tinker_jax.engine.registry import (FILE as REGISTRY_FILE, RESTORABLE, Registry, TinkerPath, check_metadata,
                                       check_name, check_ttl, new_run_id)
from tinker_jax.engine.scheduler import Request
from tinker_jax.engine.worker import BaseWorker
from tinker_jax.errors import NotFound, Overloaded, Unavailable, UserError
from tinker_jax.futures import failed, resolved, then
from tinker_jax.models.config import load_config
from tinker_jax.models.decoder import probe_attention
from tinker_jax.models.lora import LoraSpec
from tinker_jax.models.sharding import make_mesh
from tinker_jax.sampling import kernels
from tinker_jax.sampling.params import check_num_samples
from tinker_jax.sampling.snapshot import WeightSnapshot
from tinker_jax.training import batching, step
from tinker_jax.training.optim import AdamHP, DimuonHP, check_optim_params, optimizer_kind

log = logging.getLogger("tinker_jax.engine")

LOCAL = "local"  # the tenant of in-process requests


@dataclass
class _Handle:
    """What the front knows of a run: where it lives and (once created) its adapter spec."""

    run_id: str
    worker: BaseWorker
    spec: LoraSpec | None
    full: bool
    created: bool = False
    optimizer: str = "adamw"  # training.optim.OPTIMIZERS, known once created


class Engine(EngineAPI):
    def __init__(self, config: EngineConfig):
        self.config = config
        # First: joining the other processes must happen before anything starts the JAX backend.
        distributed.initialize(config.distributed)
        self.procs = (replicas.Processes(config.distributed.heartbeat_timeout_s) if distributed.multi_process()
                      else None)
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._dir_lock: datadir.DataDirLock | None = None
        if self.procs is None or self.procs.leader:
            # One writer per data dir: the sweep and re-index below assume no one else writes the checkpoints.
            self._dir_lock = datadir.DataDirLock(self.data_dir, "engine")
            # A corrupt registry is set aside here and rebuilt below from the checkpoints' own records.
            self.registry = Registry.open(self.data_dir / REGISTRY_FILE, self.data_dir)
        else:  # the leader owns the data dir; a follower's index of what it replayed lives in memory
            self.registry = Registry(":memory:", self.data_dir)
        # Every writer of an owner's checkpoints (each base model's worker, copy_weights) counts against one ledger.
        self.quota = CheckpointQuota(config.checkpoint_quota_bytes, lambda owner: self.registry.usage(owner)[1])
        if config.sampler.backend != "jax" and self.procs is not None:
            raise ValueError(f"sampler.backend: {config.sampler.backend} does not run on several processes; use jax")
        if config.sampler.backend == "vllm":  # fail at start, not on the first sample request
            from tinker_jax.sampling.vllm_backend import require_vllm

            require_vllm()
        if config.compile_cache:
            enable_compile_cache(self.data_dir / "jax_cache")
        self.mesh = make_mesh(config.mesh)
        self.attention = config.training_attention(jax.default_backend())
        if self.attention == "cudnn" and (jax.default_backend() != "gpu" or config.dtype != "bfloat16"):
            raise ValueError(f"config.attention: cudnn needs a GPU and dtype bfloat16 (backend "
                             f"{jax.default_backend()!r}, dtype {config.dtype!r}); use auto or einsum")
        self._lock = threading.Lock()  # guards the dicts below; never held across I/O or device work
        self._shut_down = False
        self._workers: dict[str, BaseWorker] = {}
        self._handles: dict[str, _Handle] = {}
        self._snapshots: dict[str, WeightSnapshot] = {}
        self.stability = stability.StabilityLog(config.stability_log_tokens, config.stability_idle_s)
        self._path_pending: dict[str, list[Future]] = {}  # checkpoint path -> unfinished requests on it, in order
        self._order_lock = threading.Lock()  # path order + queueing, atomically (taken before _lock, never inside)
        # Work on checkpoint paths that needs no device (delete, publish, TTL), on its path's turn, off the callers.
        self._path_work = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tinker-jax-paths")
        self._inflight: collections.Counter = collections.Counter()  # tenant -> requests not finished
        self._open: set[Future] = set()  # every request's future until it finishes
        if self.procs is not None:  # a lost process: what is in flight fails now, whatever the device threads do
            self.procs.on_gone(self._fail_open)
        self._refused = 0  # submits refused with Overloaded so far
        self._ids = itertools.count(1)
        self._follower: threading.Thread | None = None
        self._following = threading.Event()  # set: stop following
        self.follow_error: BaseException | None = None
        if self.procs is None or self.procs.leader:
            self._sweep_checkpoints()
            self._reindex()
        else:
            self._follower = threading.Thread(target=self._follow, name="tinker-jax-follower", daemon=True)
            self._follower.start()
        # An engine nobody shut down still stops its workers (and finishes their checkpoint writes) at exit, before
        # the interpreter tears down the threads that drive the device; then the registry merges its WAL.
        weakref.finalize(self, _stop_workers, self._workers, self.registry, self.procs, self._following,
                         self._dir_lock, self._path_work)

    # ------------------------------------------------------------------------------------------ plumbing
    def _sweep_checkpoints(self) -> None:
        """Start-up recovery: temporaries of commits killed mid-way are removed (checkpoints reported saved are
        complete directories, never these)."""
        root = self.data_dir / "checkpoints"
        if root.is_dir():
            for kind_dir in root.glob("*/*"):
                for p in atomic.sweep(kind_dir):
                    log.info("removed the leftover of an interrupted checkpoint write: %s", p)

    def _reindex(self) -> None:
        """Make the registry agree with the checkpoints on disk (the disk is the truth: a lost or stale registry
        comes back whole, owners included)."""
        report = index.reindex(self.registry, self.data_dir / "checkpoints")
        if report.changed() or report.unreadable:
            log.warning("checkpoint registry re-indexed from disk: %s", report.summary())
        else:
            log.info("checkpoint registry matches disk: %s", report.summary())
        if report.unowned:
            log.warning("%d checkpoints have no recorded owner: with API keys configured no key sees them until "
                        "`tinker-jax admin chown` gives their run one", report.unowned)

    def _follow(self) -> None:
        """A follower's device loop: run the leader's decisions, in order, until it says stop."""
        try:
            while True:
                msg = self.procs.log.next(self._following)
                if msg is None or msg[0] == "stop":
                    return
                kind, name, *args = msg
                worker = self._worker(name)
                if kind == "load":
                    worker.load_here()
                elif kind == "round":
                    worker.replay(*args)
                elif kind == "sample":
                    worker.replay_sample(*args)
                elif kind == "forget":
                    worker.forget(*args)
                else:
                    raise RuntimeError(f"unknown message from the leader: {kind!r}")
        except BaseException as e:  # noqa: BLE001 - this process can no longer follow: say so, fail what waits
            log.exception("process %d stopped following the leader", self.procs.pid)
            self.follow_error = e

    def follow(self, timeout: float | None = None) -> BaseException | None:
        """A follower: wait until the leader stops (or this process can no longer follow, or `timeout` passes).
        Returns why it stopped following, None when the leader said stop."""
        if self._follower is not None:
            self._follower.join(timeout)
        return self.follow_error

    def _worker(self, base_model: str) -> BaseWorker:
        with self._lock:
            w = self._workers.get(base_model)
        if w is not None and w.load_error is not None:  # a failed load is tried again by the next request
            with self._lock:
                if self._workers.get(base_model) is w:
                    del self._workers[base_model]
            w.stop(timeout=0)
            w = None
        if w is not None:
            return w
        path = self.config.models.get(base_model) if isinstance(base_model, str) else None
        if path is None and self.config.local_paths and isinstance(base_model, str) and \
                (Path(base_model) / "config.json").is_file():
            path = base_model  # a local HF directory named by its path
        if path is None:
            raise NotFound(f"base_model: unknown model {base_model!r}; served: {', '.join(self.config.models)}")
        cfg = load_config(path)  # config.json only: the weights load on the worker's own thread
        with self._lock:
            return self._workers.setdefault(base_model, BaseWorker(self, base_model, Path(path), cfg))

    def _handle(self, model_id: str) -> _Handle:
        with self._lock:
            h = self._handles.get(model_id)
        if h is None:
            raise NotFound(f"model_id: unknown model {model_id!r}")
        return h

    def _admit(self, tenant: str) -> None:
        with self._lock:
            if self._inflight[tenant] >= self.config.max_queued_per_tenant:
                self._refused += 1
                raise Overloaded(f"too many requests in flight for this session ({self._inflight[tenant]}, limit "
                                 f"{self.config.max_queued_per_tenant}); retry shortly")
            total = sum(self._inflight.values())
            if total >= self.config.max_queued:
                self._refused += 1
                raise Overloaded(f"the server has {total} requests in flight (limit {self.config.max_queued}); "
                                 "retry shortly")
            self._inflight[tenant] += 1

    def _release(self, tenant: str) -> None:
        with self._lock:
            self._inflight[tenant] -= 1
            if self._inflight[tenant] <= 0:
                del self._inflight[tenant]

    def _bounded(self, tenant: str, fut: Future) -> Future:
        with self._lock:
            self._open.add(fut)

        def done(f: Future) -> None:
            self._release(tenant)
            with self._lock:
                self._open.discard(f)

        fut.add_done_callback(done)
        return fut

    def _fail_open(self, why: str) -> None:
        """Fail every unfinished request with `why` (a process of the engine is gone: nothing more can finish, and
        a device thread may stay blocked in a collective with its peer gone until the collective times out)."""
        with self._lock:
            futs = list(self._open)
        for f in futs:
            try:
                f.set_exception(Unavailable(why))
            except InvalidStateError:  # finished meanwhile
                pass

    def _unavailable(self) -> Unavailable | None:
        gone = self.procs.gone if self.procs is not None else None
        return Unavailable(gone) if gone is not None else None

    def _submit(self, worker: BaseWorker, kind: str, body: Any, *, run: str | None = None,
                tenant: str | None = None, tokens: int = 0, paths: Sequence[TinkerPath] = ()) -> Future:
        """Queue one typed request on `worker` (Overloaded, raised, when a bound is reached)."""
        tenant = tenant or LOCAL
        if (down := self._unavailable()) is not None:
            return failed(down)
        if self.procs is not None and kind not in replicas.SUPPORTED_KINDS:
            return failed(UserError(f"{kind}: not supported yet when the engine spans several processes "
                                    f"({self.procs.count}); supported: {', '.join(replicas.SUPPORTED_KINDS)}"))
        self._admit(tenant)
        fut = self._bounded(tenant, Future())
        keys = [str(p) for p in paths]
        # Checkpoint paths: this request runs after every unfinished request submitted before it on each path (all
        # of them, not only the last: a cancelled request in the middle must not let a later one skip ahead). The
        # order is taken and the request queued under one lock, so the run's queue and the path order agree even
        # when several threads submit to one run.
        with self._order_lock:
            with self._lock:
                after = tuple(f for k in keys for f in self._path_pending.get(k, ()) if not f.done())
                for k in keys:
                    self._path_pending.setdefault(k, []).append(fut)
            try:
                worker.submit(Request(kind, body, fut, run=run, tenant=tenant, tokens=tokens, after=after))
            except BaseException as e:  # noqa: BLE001 - not queued: done now (released; off its paths below)
                fut.set_exception(e)
        if keys:
            fut.add_done_callback(lambda f: self._path_done(keys, f))
        return fut

    def _path_done(self, keys: list[str], fut: Future) -> None:
        with self._lock:
            for k in keys:
                pending = [f for f in self._path_pending.get(k, ()) if f is not fut and not f.done()]
                if pending:
                    self._path_pending[k] = pending
                else:
                    self._path_pending.pop(k, None)

    def checkpoint_dir(self, p: TinkerPath) -> Path:
        return self.registry.checkpoint_dir(p)

    def attention_for(self, cfg) -> str:
        """The configured kernel; under `auto`, cuDNN only after a small probe with this model's head layout
        compiles and runs, so a GPU whose cuDNN lacks the kernel trains with einsum instead of failing."""
        if self.attention != "cudnn" or self.config.attention == "cudnn":
            return self.attention
        why = probe_attention("cudnn", cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        if why:
            log.warning("attention: cuDNN flash attention unavailable (%s); training uses einsum attention", why)
            return "einsum"
        return "cudnn"

    # called by workers
    def run_created(self, run_id: str, spec: LoraSpec | None, optimizer: str | None = None) -> None:
        with self._lock:
            h = self._handles.get(run_id)
            if h is not None:
                h.spec, h.full, h.created = spec, spec is None, True
                h.optimizer = optimizer or h.optimizer

    def run_unloaded(self, run_id: str) -> None:
        with self._lock:
            self._handles.pop(run_id, None)

    def shutdown(self) -> None:
        """Stop every worker (checkpoint writes in flight finish), close the registry, release the data dir. Once:
        a second call (the server's app stops it, then its process) does nothing."""
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
            workers = dict(self._workers)
        log.info("engine: stopping")
        try:
            _stop_workers(workers, self.registry, self.procs, self._following, self._dir_lock, self._path_work)
        except BaseException:
            with self._lock:
                self._shut_down = False  # a later call tries again
            raise
        log.info("engine: stopped")

    # ------------------------------------------------------------------------------------------ discovery
    def capabilities(self) -> list[str]:
        return list(self.config.models)

    def tokenizer_path(self, base_model: str) -> Path:
        return self._worker(base_model).path

    # ------------------------------------------------------------------------------------------ runs
    def _reserve(self, model_id: str | None, worker: BaseWorker, spec: LoraSpec | None, full: bool) -> str:
        model_id = check_name(model_id or new_run_id(), "model_id")
        with self._lock:
            if model_id in self._handles:
                raise UserError(f"model_id: {model_id!r} already exists")
            if spec is not None and sum(1 for h in self._handles.values() if h.worker is worker and h.spec is not None
                                        and h.spec.rank == spec.rank) >= self.config.lora.max_slots:
                # Refused before it is queued, so the SDK retries it (429) while other runs finish.
                raise Overloaded(f"all {self.config.lora.max_slots} LoRA slots of rank {spec.rank} on {worker.name} "
                                 "are in use; retry when a model is unloaded", retry_after_s=30.0)
            self._handles[model_id] = _Handle(model_id, worker, spec, full)
        return model_id

    def _unreserve_on_failure(self, model_id: str, fut: Future) -> Future:
        def done(f: Future) -> None:
            if f.cancelled() or f.exception() is not None:
                with self._lock:
                    h = self._handles.get(model_id)
                    if h is not None and not h.created:
                        del self._handles[model_id]
        fut.add_done_callback(done)
        return fut

    def create_model(self, base_model: str, *, rank: int = 32, seed: int | None = None, train_mlp: bool = True,
                     train_attn: bool = True, train_unembed: bool = True, full_finetune: bool | None = None,
                     model_id: str | None = None, user_metadata: dict | None = None, owner: str | None = None,
                     tenant: str | None = None, optimizer: Any = None) -> Future:
        try:
            full = self.config.full_finetune if full_finetune is None else full_finetune
            user_metadata = check_metadata(user_metadata)
            kind = optimizer_kind(optimizer)
            if full and kind != "adamw":
                raise UserError(f"optimizer_config.type: {kind!r} is offered for LoRA runs only; full fine-tuning "
                                "uses AdamW")
            if self.procs is not None:  # every process names the run and draws its seed alike
                drawn_id, drawn_seed = self.procs.draw()
                model_id, seed = model_id or drawn_id, drawn_seed if seed is None else seed
            seed = int(seed) if seed is not None else secrets.randbits(32)
            spec = None if full else LoraSpec.from_flags(
                rank, train_attn=train_attn, train_mlp=train_mlp, train_unembed=train_unembed,
                alpha=self.config.lora.alpha, allowed=self.config.lora.target_modules, seed=seed)
            worker = self._worker(base_model)
            if spec is not None:
                worker.check_rank(spec.rank)
            model_id = self._reserve(model_id, worker, spec, bool(full))
        except UserError as e:
            return failed(e)
        try:
            fut = self._submit(worker, "create", rq.CreateRun(spec, user_metadata, owner, optimizer=kind),
                               run=model_id, tenant=tenant)
        except Overloaded:
            self.run_unloaded(model_id)
            raise
        return self._unreserve_on_failure(model_id, fut)

    def create_model_from_state(self, path: str, optimizer: bool, *, model_id: str | None = None,
                                base_model: str | None = None, user_metadata: dict | None = None,
                                owner: str | None = None, tenant: str | None = None,
                                optimizer_config: Any = None) -> Future:
        """optimizer_config (None: the checkpoint's run's optimizer): another family only with `optimizer` False (a
        fresh state of it); with the saved state it must be the checkpoint's."""
        try:
            kind = None if optimizer_config is None else optimizer_kind(optimizer_config)
            user_metadata = check_metadata(user_metadata)
            p = TinkerPath.parse(path)
            if self.procs is not None:  # every process names the run alike
                model_id = model_id or self.procs.draw()[0]
            base = base_model or self._base_of_checkpoint(p)
            worker = self._worker(base)
            model_id = self._reserve(model_id, worker, None, False)
        except UserError as e:
            return failed(e)
        body = rq.CreateRun(None, user_metadata, owner, from_path=p, with_optimizer=bool(optimizer), optimizer=kind)
        try:
            fut = self._submit(worker, "create", body, run=model_id, tenant=tenant, paths=[p])
        except Overloaded:
            self.run_unloaded(model_id)
            raise
        return then(self._unreserve_on_failure(model_id, fut),
                    lambda mid: tt.LoadWeightsResponse(path=path, model_id=mid))

    def _base_of_checkpoint(self, p: TinkerPath) -> str:
        run = self.registry.get_run(p.run_id)
        if run is not None:
            return run.base_model
        try:
            return checkpoints.read_meta(self.checkpoint_dir(p))["base_model"]
        except (checkpoints.CheckpointError, KeyError):
            raise NotFound(f"path: checkpoint {p} not found") from None

    def unload_model(self, model_id: str, *, tenant: str | None = None) -> Future:
        try:
            h = self._handle(model_id)
        except NotFound:
            return resolved(None)  # nothing to release
        return self._submit(h.worker, "unload", rq.Unload(), run=model_id, tenant=tenant)

    def get_info(self, model_id: str) -> tt.GetInfoResponse:
        h = self._handle(model_id)
        if not h.created:
            raise NotFound(f"model_id: {model_id!r} is still being created")
        w = h.worker
        return tt.GetInfoResponse(
            model_id=model_id, model_name=w.name, is_lora=h.spec is not None,
            lora_rank=None if h.spec is None else h.spec.rank,
            optimizer_config=(tt.DimuonOptimizerConfig() if h.optimizer == "dimuon" else tt.AdamOptimizerConfig()),
            model_data=tt.get_info_response.ModelData(arch=w.cfg.architecture, model_name=w.name,
                                                      tokenizer_id=w.name))  # the served name, never a server path

    def run_state(self, model_id: str) -> dict:
        """Host copies of a run's weights, gradients and Adam state (tests and debugging)."""
        return self._handle(model_id).worker.run_state(model_id)

    # ------------------------------------------------------------------------------------------ training
    def forward_backward(self, model_id: str, data: Sequence[tt.Datum], loss_fn: str,
                         loss_fn_config: dict | None = None, forward_only: bool = False, *,
                         tenant: str | None = None) -> Future:
        try:
            h = self._handle(model_id)
            cfg = h.worker.cfg
            if loss_fn == "stable_reinforce":  # its behaviour logprobs are the recorded samples' (before validation)
                data = self.stability.resolve(list(data), tenant or LOCAL)
            rows = batching.validate(list(data), loss_fn, loss_fn_config, vocab_size=cfg.vocab_size,
                                     max_len=min(cfg.max_position_embeddings, self.config.max_seq_len),
                                     max_tokens=self.config.max_tokens_per_request)
        except UserError as e:
            return failed(e)
        return self._submit(h.worker, "forward" if forward_only else "forward_backward",
                            rq.Train(rows, bool(forward_only)), run=model_id, tenant=tenant, tokens=rows.n_tokens)

    def optim_step(self, model_id: str, adam: AdamHP | DimuonHP | Any, *, tenant: str | None = None) -> Future:
        try:
            h = self._handle(model_id)
            hp = adam if isinstance(adam, (AdamHP, DimuonHP)) else check_optim_params(adam)
        except UserError as e:
            return failed(e)
        return self._submit(h.worker, "optim_step", rq.OptimStep(hp), run=model_id, tenant=tenant)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_state(self, model_id: str, name: str, ttl_seconds: int | None = None, user_metadata=None, *,
                   overwrite: bool = True, tenant: str | None = None) -> Future:
        try:
            h = self._handle(model_id)
            p = TinkerPath(model_id, "weights", check_name(name, "name"))
            check_ttl(ttl_seconds)
            user_metadata = check_metadata(user_metadata)
            # A quick answer from this process's registry; on several processes only the leader's knows, and every
            # process must queue the request alike: the check on the path's turn (the leader's, settled) decides.
            if not overwrite and self.procs is None and self.registry.get_checkpoint(p) is not None:
                raise UserError(f"path: checkpoint {p} already exists (save under another name, or overwrite)")
        except UserError as e:
            return failed(e)
        # Checked again on the path's turn (an earlier save queued on the same path is not listed until written).
        body = rq.Save(p, True, ttl_seconds, user_metadata, overwrite=overwrite)
        return then(self._submit(h.worker, "save", body, run=model_id, tenant=tenant, paths=[p]),
                    lambda r: tt.SaveWeightsResponse(path=r[0]))

    def load_state(self, model_id: str, path: str, optimizer: bool, *, tenant: str | None = None) -> Future:
        try:
            h = self._handle(model_id)
            p = TinkerPath.parse(path)
        except UserError as e:
            return failed(e)
        return self._submit(h.worker, "load", rq.Load(p, bool(optimizer)), run=model_id, tenant=tenant, paths=[p])

    def save_weights_for_sampler(self, model_id: str, name: str | None, ttl_seconds: int | None = None,
                                 user_metadata=None, *, tenant: str | None = None, sampler: bool = True) -> Future:
        """With a name, a sampler checkpoint; with `sampler` (or without a name) also a sampler of the weights in
        memory. -> (path or None, sampler id or None)."""
        try:
            h = self._handle(model_id)
            p = TinkerPath(model_id, "sampler_weights", check_name(name, "name")) if name else None
            check_ttl(ttl_seconds)
            user_metadata = check_metadata(user_metadata)
        except UserError as e:
            return failed(e)
        body = rq.Save(p, False, ttl_seconds, user_metadata, snapshot=sampler or p is None)
        fut = self._submit(h.worker, "save", body, run=model_id, tenant=tenant, paths=[p] if p else [])
        return then(fut, lambda r: (r[0], self._register_snapshot(r[1])))

    def save_weights_external(self, model_id: str, name: str, ttl_seconds: int | None = None, user_metadata=None,
                              *, tenant: str | None = None) -> Future:
        """The run's weights as Hugging Face files (a LoRA run: a PEFT adapter; full: a merged model), a checkpoint
        tinker://<run>/external_weights/<name> whose files are downloaded (`checkpoint_files`), never loaded.
        -> (path, size in bytes)."""
        try:
            h = self._handle(model_id)
            p = TinkerPath(model_id, "external_weights", check_name(name, "path"))
            check_ttl(ttl_seconds)
            user_metadata = check_metadata(user_metadata)
        except UserError as e:
            return failed(e)
        body = rq.Save(p, False, ttl_seconds, user_metadata, export=True)
        return self._submit(h.worker, "save", body, run=model_id, tenant=tenant, paths=[p])

    def copy_checkpoint(self, source: str, run_id: str, *, owner: str | None, ttl_seconds: int | None = None) -> str:
        """On the source's turn on its path (after a save replacing it, before a delete sent later), blocking."""
        check_ttl(ttl_seconds)
        return self._path_turn_async(TinkerPath.parse(source, "source_path"), lambda: files.copy_checkpoint(
            self.registry, source, run_id, owner=owner, ttl_seconds=ttl_seconds, quota=self.quota)).result()

    def checkpoint_files(self, path: str) -> dict[str, int]:
        """Listed on the checkpoint's turn on its path: an overwrite or delete renames the directory aside and
        removes it, and a listing beside one saw part of the files, or failed (blocking)."""
        return self._path_turn_async(TinkerPath.parse(path),
                                     lambda: files.checkpoint_files(self.registry, path)).result()

    def checkpoint_file(self, path: str, name: str) -> Path:
        """Looked up on the path's turn, as checkpoint_files (blocking)."""
        return self._path_turn_async(TinkerPath.parse(path),
                                     lambda: files.checkpoint_file(self.registry, path, name)).result()

    def checkpoint_archive(self, path: str) -> Path:
        """Built on the checkpoint's turn on its path (not from files a save or delete is replacing), blocking."""
        return self._path_turn_async(TinkerPath.parse(path),
                                     lambda: files.checkpoint_archive(self.registry, path)).result()

    def weights_info(self, path: str) -> dict:
        """From the checkpoint's metadata; an external_weights one (Hugging Face files, no Orbax metadata) answers
        from its record's run configuration, which holds the same fields."""
        p = TinkerPath.parse(path, "tinker_path")
        d = self.checkpoint_dir(p)
        try:
            if p.kind in RESTORABLE:
                meta = checkpoints.read_meta(d)
            else:
                meta = (checkpoints.read_record(atomic.resolve(d)) or {}).get("run") or {}
        except checkpoints.CheckpointError:  # a RecordError (a record that cannot be read) is the server's fault
            meta = {}
        if "base_model" not in meta:
            raise NotFound(f"tinker_path: checkpoint {path} not found")
        return {"base_model": meta["base_model"], "is_lora": not meta.get("full_finetune", False),
                "lora_rank": meta.get("lora_rank"), "train_attn": meta.get("train_attn"),
                "train_mlp": meta.get("train_mlp"), "train_unembed": meta.get("train_unembed")}

    def get_run(self, run_id: str) -> RunInfo | None:
        return self.registry.get_run(run_id)

    def list_runs(self) -> list[RunInfo]:
        return self.registry.list_runs()

    def get_checkpoint(self, path: str) -> CheckpointInfo | None:
        return self.registry.get_checkpoint(TinkerPath.parse(path))

    def list_checkpoints(self, run_id: str | None = None) -> list[CheckpointInfo]:
        return self.registry.list_checkpoints(run_id)

    def set_checkpoint_public(self, path: str, public: bool) -> None:
        self._change(rq.ChangeCheckpoint(TinkerPath.parse(path), fields={"public": bool(public)})).result()

    def set_checkpoint_ttl(self, path: str, ttl_seconds: int | None) -> None:
        check_ttl(ttl_seconds)
        expires = None if ttl_seconds is None else time.time() + ttl_seconds
        self._change(rq.ChangeCheckpoint(TinkerPath.parse(path), fields={"expires": expires})).result()

    def _change(self, body: rq.ChangeCheckpoint, tenant: str | None = None) -> Future:
        """Delete or annotate a checkpoint on its path's turn. One process: on the path-work thread (no device, so
        its base model need not be loaded). Several: through its base model's log, so that every process has
        finished what came before on the path (a load still reading the files) before process 0 changes them;
        every process gets process 0's outcome."""
        if self.procs is None:
            # A key's deletes count against its bound like its other requests (refused before anything is queued);
            # publish and TTL changes (synchronous, for a request being answered) do not.
            if tenant is not None:
                self._admit(tenant)
            turn = self._path_turn_async(body.path, lambda: self.change_checkpoint(body))
            return turn if tenant is None else self._bounded(tenant, turn)
        try:
            worker = self._worker(self._base_of_checkpoint(body.path))
        except UserError as e:
            return failed(e)
        return self._submit(worker, "change", body, tenant=tenant, paths=[body.path])

    def change_checkpoint(self, body: rq.ChangeCheckpoint) -> Any:
        """(On the path's turn) `body`'s change: deleted -> whether the record existed; annotated -> None."""
        if body.delete:
            return self.delete_checkpoint_now(body.path, body.only_if_expired)
        self._annotate_now(body.path, **body.fields)
        return None

    def _path_turn_async(self, p: TinkerPath, fn: Callable[[], Any]) -> Future:
        """Run `fn` on `p`'s turn, on the path-work thread: after every unfinished request submitted before on that
        path, and before any submitted after (so a publish cannot land on a checkpoint that an earlier save is
        replacing, nor a delete remove it under a load). The turn is taken now; the wait is not on the caller."""
        key, turn = str(p), Future()
        with self._order_lock:
            with self._lock:
                after = [f for f in self._path_pending.get(key, ()) if not f.done()]
                self._path_pending.setdefault(key, []).append(turn)
        turn.add_done_callback(lambda f: self._path_done([key], f))

        def run() -> None:
            if not turn.set_running_or_notify_cancel():  # cancelled while waiting: it never runs
                return
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - delivered through the future
                turn.set_exception(e)
                return
            turn.set_result(result)

        def start() -> None:
            try:
                self._path_work.submit(run)
            except RuntimeError as e:  # shut down
                turn.set_exception(e)

        # Started by the last earlier request to finish (a callback, not a blocked thread; and a cancelled request
        # counts as finished at once: `concurrent.futures.wait` would wait for the worker to notice the cancel).
        left, lock = [len(after)], threading.Lock()

        def one_done(_f: Future) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                start()

        if not after:
            start()
        for f in after:
            f.add_done_callback(one_done)
        return turn

    def _annotate_now(self, p: TinkerPath, **fields: Any) -> None:
        """Change a checkpoint's published flag or expiry: its own record first (the truth, which a re-index
        reads), then the registry."""
        d = atomic.recover(self.checkpoint_dir(p))
        if self.registry.get_checkpoint(p) is None or not d.is_dir():
            raise NotFound(f"path: checkpoint {p} not found")
        index.rewrite_record(self.registry, p, d, **fields)
        self.registry.set_checkpoint(p, **{k: int(v) if isinstance(v, bool) else v for k, v in fields.items()})

    def delete_checkpoint(self, path: str, *, tenant: str | None = None, only_if_expired: bool = False) -> Future:
        """Remove a checkpoint's files and record, after every request submitted before on that path, on a thread of
        its own: it touches no device state, so its base model need not be loaded (or served at all)."""
        try:
            p = TinkerPath.parse(path)
        except UserError as e:
            return failed(e)
        return self._change(rq.ChangeCheckpoint(p, delete=True, only_if_expired=only_if_expired), tenant)

    def delete_checkpoint_now(self, p: TinkerPath, only_if_expired: bool = False) -> bool:
        """(On the path's turn) the record, then the files. Returns whether the record existed. only_if_expired:
        nothing happens unless the record is (still) past its TTL, e.g. not saved again since it expired."""
        if only_if_expired:
            info = self.registry.get_checkpoint(p)
            if info is None or info.expires is None or info.expires > time.time():
                return False
        # The files first, atomically (renamed aside, then removed): a crash in between leaves a registry row without
        # files, which the next start's re-index drops, never files without a row that it would list again.
        atomic.remove(self.checkpoint_dir(p))
        files.drop_archives(self.registry, str(p))  # a deleted checkpoint leaves no tar of it behind
        return self.registry.delete_checkpoint(p)

    def expire_checkpoints(self) -> list[str]:
        out = []
        for p in self.registry.expired():
            try:
                self.delete_checkpoint(str(p), tenant="ttl", only_if_expired=True)
            except Overloaded:  # the queues are full: the next pass tries again
                continue
            log.info("checkpoint %s expired (TTL); deleting it", p)
            out.append(str(p))
        return out

    # ------------------------------------------------------------------------------------------ sampling
    def _register_snapshot(self, snap: WeightSnapshot | None) -> str | None:
        if snap is None:
            return None
        sid = f"sampler-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        with self._lock:
            self._snapshots[sid] = snap
        return sid

    def create_sampler(self, model_path: str | None = None, base_model: str | None = None, *,
                       tenant: str | None = None) -> str:
        """A sampler id for a checkpoint's weights or a base model (blocks until the weights are in memory)."""
        if model_path:
            p = TinkerPath.parse(model_path, "model_path")
            worker = self._worker(self._base_of_checkpoint(p))
            fut = self._submit(worker, "open_snapshot", rq.OpenSnapshot(p), tenant=tenant, paths=[p])
        elif base_model:
            worker = self._worker(base_model)
            fut = self._submit(worker, "open_snapshot", rq.OpenSnapshot(None), tenant=tenant)
        else:
            raise UserError("create_sampling_session: give model_path or base_model")
        return self._register_snapshot(fut.result())

    def release_sampler(self, sampler_id: str) -> None:
        """Forget a sampler's snapshot; samples already submitted keep their reference and finish, and its adapter
        leaves the sampler's tables once no row uses it."""
        with self._lock:
            self._snapshots.pop(sampler_id, None)

    def _snapshot(self, sampler_id: str) -> WeightSnapshot:
        with self._lock:
            snap = self._snapshots.get(sampler_id)
        if snap is None:
            raise NotFound(f"sampling_session_id: unknown sampler {sampler_id!r}")
        return snap

    def sampler_base_model(self, sampler_id: str) -> str:
        return self._snapshot(sampler_id).base_model

    def sample(self, sampler_id: str, prompt: tt.ModelInput, num_samples: int, sampling_params: tt.SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, *,
               tenant: str | None = None, topk_sample_logprobs: int = 0,
               target_prompt_logprobs: tt.TensorData | None = None, prompt_alt_tokens_k: int = 0,
               record_stability_info: bool = False, sequence_ids: Sequence[str] | None = None) -> Future:
        """`sequence_ids`: the SampledSequence ids, one per sample (default "<sampler id>:<n>:<i>"). With
        `record_stability_info` each sequence is recorded for stable_reinforce before the future completes, so a
        training request sent on seeing the result finds it."""
        try:
            snap = self._snapshot(sampler_id)
            if not isinstance(prompt, tt.ModelInput):
                raise UserError(f"prompt: expected a tinker.types.ModelInput (ModelInput.from_ints(tokens)), got "
                                f"{type(prompt).__name__}")
            tokens = batching.datum_tokens(tt.Datum(model_input=prompt, loss_fn_inputs={}), 0)
            worker = self._worker(snap.base_model)
            # A model that is not loaded fails here. num_samples before the sequence ids below are made of it.
            num_samples = check_num_samples(num_samples, worker.get_sampler().limits)
            if (down := self._unavailable()) is not None:
                raise down
        except (UserError, RuntimeError) as e:
            return failed(e)
        tenant = tenant or LOCAL
        if sequence_ids is None:  # unique in this engine (a sampler's own "<request>:<i>" restarts with each sampler)
            n = next(self._ids)
            sequence_ids = [f"{sampler_id}:{n}:{i}" for i in range(num_samples)]
        self._admit(tenant)
        try:
            submitted = worker.submit_sample(snap, tokens, sampling_params, num_samples, include_prompt_logprobs,
                                             topk_prompt_logprobs, tenant, topk_sample_logprobs,
                                             target_prompt_logprobs, prompt_alt_tokens_k, sequence_ids)
        except BaseException:
            self._release(tenant)  # counted by _admit, never queued
            raise
        fut = self._bounded(tenant, submitted)
        if not record_stability_info:
            return fut

        def record(resp: tt.SampleResponse) -> tt.SampleResponse:
            self.stability.record(tenant, tokens, resp.sequences)
            return resp

        return then(fut, record)

    def storage_usage(self, owner: str | None) -> tuple[int, int]:
        return self.registry.usage(owner)

    # ------------------------------------------------------------------------------------------ health, stats
    def health(self) -> dict:
        """Whether the engine can work: its registry answers a query, and no base model's worker thread has died
        (a model whose load failed is reported too; the next request for it loads it again)."""
        problems = []
        try:
            self.registry.ping()
        except Exception as e:  # noqa: BLE001 - reported, not raised: health is asked by probes
            problems.append(f"registry: {type(e).__name__}")
        if self.procs is not None:
            if self.procs.gone is not None:
                problems.append(self.procs.gone)
            if self.follow_error is not None:
                problems.append(f"this process stopped following the leader ({type(self.follow_error).__name__})")
        with self._lock:
            workers = dict(self._workers)
        for name, w in workers.items():
            if (problem := w.problem()) is not None:
                problems.append(f"model {name}: {problem}")
        return {"ok": not problems, "problems": problems}

    def stats(self) -> dict:
        with self._lock:
            workers = dict(self._workers)
            inflight = dict(self._inflight)
        compiled = step.compile_count() + sum(f._cache_size() for f in (kernels.prefill, kernels.decode))
        cache_dir = jax.config.jax_compilation_cache_dir
        cache = {"dir": cache_dir or None, "files": None, "bytes": None}
        if cache_dir and Path(cache_dir).is_dir():
            sizes = [f.stat().st_size for f in Path(cache_dir).rglob("*") if f.is_file()]
            cache.update(files=len(sizes), bytes=sum(sizes))
        out = {"inflight": inflight, "refused": self._refused, "programs_compiled": compiled, "models": {},
               "devices": [_device_row(d) for d in jax.local_devices()], "compile_cache": cache}
        for name, w in workers.items():
            s = dict(w.stats)
            s["loaded"] = w.loaded.is_set() and w.load_error is None
            s["attention"] = w.attention  # the training attention kernel in use (after the cuDNN probe)
            with w._cv:  # the worker changes its queues under this lock
                s["queued"] = len(w.scheduler)
            s["scheduler_rounds"] = w.scheduler.rounds
            s["lora_slots_in_use"] = {r: p.in_use() for r, p in list(w.pools.items())}
            if w.sampler is not None and hasattr(w.sampler, "stats_now"):
                s["sampler"] = w.sampler.stats_now()
            out["models"][name] = s
        return out


def _device_row(d) -> dict:
    """One local device and its memory as the runtime reports it (None where it does not, e.g. on CPU)."""
    try:
        mem = d.memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend implements it
        mem = {}
    return {"id": d.id, "kind": d.device_kind, "platform": d.platform,
            "bytes_in_use": mem.get("bytes_in_use"), "bytes_limit": mem.get("bytes_limit")}


STOP_WAIT_S = 10.0  # shutdown: how long each worker's round in progress may take to end


def _stop_workers(workers: dict, registry: Registry, procs: replicas.Processes | None = None,
                  following: threading.Event | None = None, dir_lock: datadir.DataDirLock | None = None,
                  path_work: ThreadPoolExecutor | None = None) -> None:
    if following is not None:
        following.set()  # a follower stops reading the leader's log
    running = [w.name for w in list(workers.values()) if not w.stop(timeout=STOP_WAIT_S)]
    if path_work is not None:  # deletes and annotations waiting on the workers' requests end with them
        path_work.shutdown(wait=True)
    if procs is not None and procs.leader:
        try:
            procs.log.publish(("stop",))  # the followers' loops end with the leader's
        except Exception:  # noqa: BLE001 - the coordination service is already gone
            pass
    if running:
        # A round still runs (a stuck device call): it may yet write a checkpoint, which must be indexed, and no
        # other engine may take the data dir meanwhile. The registry and the lock go with the process.
        log.error("engine: the loop of %s did not end within %.0f s; the registry and the data dir stay held until "
                  "this process exits", ", ".join(running), STOP_WAIT_S)
    else:
        registry.close()  # after the workers: their last checkpoint writes are indexed first
        if dir_lock is not None:
            dir_lock.release()
    if procs is not None:
        procs.stop()
        # Every process leaves together (a barrier in the coordination service, which lives in process 0): a leader
        # that exited first would take the service with it and abort the followers still stopping. A leader that
        # lost a process leaves at once.
        distributed.shutdown(together=procs.gone is None)


def enable_compile_cache(path: Path) -> None:
    """Persist compiled XLA programs so a restarted process skips recompiling the same step shapes."""
    if jax.config.jax_compilation_cache_dir:  # the process (or the user) already chose one
        return
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

