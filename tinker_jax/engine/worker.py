"""One base model's device loop: it owns that model's device state and executes its request log.

State: the base weights (loaded on this thread at first use, so a load never stalls other models), one
AdapterPool per LoRA rank, full fine-tuning runs' private weights, and the sampler (driven from here, not from a
thread of its own). The loop alternates between training rounds (engine.scheduler) and sampler steps; when both
have work each gets about half the device time (the one that has used less goes next).

Every device call here is one of the pure jitted functions of training.step / sampling.kernels; every request's
failure is confined to its own future: a UserError is the caller's mistake, anything else is logged with its
traceback and reported as the engine's fault.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import tinker.types as tt
from flax import nnx

from tinker_jax import atomic, distributed
from tinker_jax.engine import checkpoints, replicas, requests as rq
from tinker_jax.engine.pools import NULL_SLOT, AdapterPool, FullState, Run
from tinker_jax.engine.registry import KINDS, RESTORABLE, TinkerPath
from tinker_jax.engine.scheduler import Request, Round, Scheduler
from tinker_jax.errors import NotFound, Stopped, Unavailable, UserError
from tinker_jax.futures import begin, failed
from tinker_jax.hf.convert import export_merged_hf, export_peft_adapter
from tinker_jax.hf.weights import load_decoder
from tinker_jax.models import lora as lora_math
from tinker_jax.models import moe, quant
from tinker_jax.models.config import ModelConfig
from tinker_jax.models.decoder import StaticGraph, merge
from tinker_jax.models.lora import Adapter, LoraSpec
from tinker_jax.models.sharding import batch_shards, pool_shardings, rows_sharding, state_shardings
from tinker_jax.sampling.snapshot import WeightSnapshot
from tinker_jax.training import batching, step

log = logging.getLogger("tinker_jax.engine")

_ACTIVE_S = 1.0  # a run that submitted within this long is "active" for the batching window
_GAP_S = 0.0005  # the batching window ends when no request arrived for this long
_PROBE_ROUNDS = 16  # while waiting has not been paying off, try it again every this many rounds
_MAX_WRITES = 4  # checkpoint writes waiting for the disk (each holds a host copy of a run's state)


class Host(Protocol):
    """What a worker needs of the engine that owns it (engine.core.Engine)."""

    config: Any  # tinker_jax.config.EngineConfig
    mesh: Any  # jax.sharding.Mesh
    registry: Any  # engine.registry.Registry
    procs: Any  # engine.replicas.Processes, or None on one process

    def checkpoint_dir(self, p: TinkerPath) -> Path: ...

    def attention_for(self, cfg: ModelConfig) -> str: ...

    def run_created(self, run_id: str, spec: LoraSpec | None, optimizer: str | None = None) -> None: ...

    def run_unloaded(self, run_id: str) -> None: ...

    def change_checkpoint(self, body: rq.ChangeCheckpoint) -> Any: ...


class BaseWorker:
    def __init__(self, engine: Host, name: str, path: Path, cfg: ModelConfig):
        self.engine, self.name, self.path, self.cfg = engine, name, Path(path), cfg
        self.config = engine.config
        self.mesh = engine.mesh
        self.scheduler = Scheduler(self.config.round_tokens)
        self._cv = threading.Condition()
        self._stopping = False
        self._holds = 0  # while > 0 no new round or sampler step starts (hold())
        self._thread: threading.Thread | None = None
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()
        self.graphdef = self.base = self.dtype = None
        # What snapshots sample with: the training graph and base weights, or (sampler.dtype other than the engine's,
        # or sampler.quantize) a graph computing in that dtype, with int8 projections and experts where asked, and
        # a copy of the base weights to match.
        self.sample_graphdef = self.sample_base = self.sample_dtype = self.sample_quant = None
        self.attention = "einsum"
        self.pools: dict[int, AdapterPool] = {}
        self.runs: dict[str, Run] = {}
        self.lost: dict[str, str] = {}  # run id -> why its state is gone (a failed call consumed its pool)
        self.sampler = None
        self.stats = collections.Counter()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tinker-jax-io-{name}")  # writes, in order
        self._writes = threading.BoundedSemaphore(_MAX_WRITES)
        self._sampler_lock = threading.Lock()  # a lazily built (vLLM) sampler is built once
        self._busy = {"train": 0.0, "sample": 0.0}  # seconds used since both last had work (fair split)
        self._window_score, self._since_probe = 1.0, 0  # batching window: has waiting been paying off
        procs = engine.procs
        # Several processes: the leader publishes each decision before running it; a follower runs only what the
        # leader published (replay), and its own calls wait for that (mirrors).
        self._leader_procs = procs if procs is not None and procs.leader else None
        self._mirrors = replicas.Mirrors() if procs is not None and not procs.leader else None
        self._origins: dict[int, WeightSnapshot] = {}  # follower: snapshots by the request that made them
        self._forgets: collections.deque[int] = collections.deque()  # leader: snapshots gone since the last turn

    # --- submission (any thread) -------------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        if self._mirrors is not None:  # a follower: the leader's log decides what runs; this call waits for it
            self._mirrors.claim(req.future)
            return
        with self._cv:
            stopped = self._stopping
            if not stopped:
                self.scheduler.push(req)
                self._cv.notify_all()
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name=f"tinker-jax-{self.name}", daemon=True)
                    self._thread.start()
        if stopped:  # outside _cv: the future's callbacks take other locks
            req.future.set_exception(Stopped("engine: shut down"))
            return
        for f in req.after:
            f.add_done_callback(lambda _: self.wake())

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    @contextlib.contextmanager
    def hold(self):
        """Start no new round or sampler step inside the block (requests queue up; work in progress finishes).
        For maintenance and for tests that need several requests in one round."""
        with self._cv:
            self._holds += 1
        try:
            yield self
        finally:
            with self._cv:
                self._holds -= 1
                self._cv.notify_all()

    def problem(self) -> str | None:
        """Why this base model cannot work now (health): its loop thread died, or its load failed (the next request
        loads it again); None when it can."""
        thread = self._thread
        if thread is not None and not thread.is_alive() and not self._stopping:
            return "its worker stopped"
        if self.load_error is not None:
            return f"load failed ({type(self.load_error).__name__})"
        return None

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the loop (waiting up to `timeout` for the round in progress) and finish the checkpoint writes in
        flight. -> whether the loop has ended (False: a round still runs, e.g. a stuck device call)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._io.shutdown(wait=True)  # checkpoint writes in flight finish: nothing reported saved is lost
        if self.sampler is not None:
            self.sampler.stop()
        return thread is None or thread is threading.current_thread() or not thread.is_alive()

    # --- the loop ----------------------------------------------------------------------------------------------

    def _sampler_work(self) -> bool:
        s = self.sampler
        return s is not None and self.config.sampler.backend == "jax" and s.has_work()

    def _loop(self) -> None:
        with self._turn(("load", self.name)):
            self.load_here()
        window = self.config.batch_window_ms / 1000.0
        while True:
            with self._cv:
                # No timeout: every event that can make work ready notifies (submit, a dependency finishing, a
                # sample submitted, a hold released, stop), and an idle thread stays asleep through interpreter exit.
                while not self._stopping and (self._holds or not (self.scheduler.ready() or self._sampler_work())):
                    self._cv.wait()
                if self._stopping:
                    break
                if window > 0 and self.scheduler.stragglers(_ACTIVE_S):
                    self._batching_window(window)
                if self._stopping:
                    break
                train, sample = self.scheduler.ready(), self._sampler_work()
                if not (train and sample):
                    self._busy = {"train": 0.0, "sample": 0.0}  # no banking of idle time
                rnd = self.scheduler.next_round() if train and (
                    not sample or self._busy["train"] <= self._busy["sample"]) else None
            if rnd is not None:
                # Cancelled requests leave the round before it is published: every process runs the same requests.
                rnd = _begun(rnd)
            try:
                if rnd:
                    t0 = time.perf_counter()
                    with self._turn(("round", self.name, rnd.number, _items(rnd))):
                        self._execute(rnd)
                    dt = time.perf_counter() - t0
                    self._busy["train"] += dt
                    self.stats["train_seconds"] += dt
                elif sample:
                    # Several processes: the step's new requests are fixed (started) and published with it. (Not
                    # timed: waiting there for the rest of a burst, sampler.burst_gap_ms, is not sampling work.)
                    new = self.sampler.take_incoming(start=self._leader_procs is not None)
                    t0 = time.perf_counter()
                    with self._turn(("sample", self.name, [_wire(r) for r in new])):
                        self.sampler.step(new)
                    dt = time.perf_counter() - t0
                    self._busy["sample"] += dt
                    self.stats["sample_seconds"] += dt
            except BaseException as e:  # noqa: BLE001 - a bug escaped a round: fail what it held, keep serving
                log.exception("engine worker %s: a round failed", self.name)
                e = self._explain(e)
                for req in (rnd.ops + rnd.batch) if rnd else ():
                    if not req.future.done():
                        req.future.set_exception(e)
        with self._cv:
            left = list(self.scheduler.all_requests())
        for req in left:
            if not req.future.done():
                req.future.set_exception(Stopped("engine: shut down"))

    def load_here(self) -> None:
        """Load the base model on this thread (the worker's own, or a follower's device loop)."""
        try:
            self._load()
        except BaseException as e:  # noqa: BLE001 - every request of this model fails with the reason
            log.exception("loading base model %s from %s failed", self.name, self.path)
            self.load_error = e
        finally:
            self.loaded.set()

    @contextlib.contextmanager
    def _turn(self, decision: tuple):
        """On the leader of several processes: publish `decision`, then run its device programs, holding the turn
        so that every process launches programs in one order. Elsewhere: nothing."""
        procs = self._leader_procs
        if procs is None:
            yield
            return
        with procs.turn:
            gone = []
            while self._forgets:
                gone.append(self._forgets.popleft())
            if gone:  # snapshots the leader no longer holds: the followers let theirs go
                procs.log.publish(("forget", self.name, gone))
            procs.log.publish(decision)
            yield

    def submit_sample(self, snap: WeightSnapshot, tokens, params, num_samples: int, include_prompt_logprobs: bool,
                      topk_prompt_logprobs: int, tenant: str, topk_sample_logprobs: int = 0,
                      target_prompt_logprobs=None, prompt_alt_tokens_k: int = 0, sequence_ids=None) -> Future:
        """Queue a sample on this model's sampler. Several processes: the leader gives it a place in the log
        (alongside training requests) and publishes it with the sampler step that admits it; a follower's own
        call waits for its replay there (mirrors), after the same validation."""
        sampler = self.get_sampler()
        args = (snap, tokens, params, num_samples, include_prompt_logprobs, topk_prompt_logprobs)
        if self.engine.procs is None:
            return sampler.submit(*args, tenant=tenant, topk_sample_logprobs=topk_sample_logprobs,
                                  target_prompt_logprobs=target_prompt_logprobs,
                                  prompt_alt_tokens_k=prompt_alt_tokens_k, sequence_ids=sequence_ids)
        try:
            if snap.origin is None:
                raise UserError("sampler: this snapshot was not made by this engine")
            req = sampler.prepare(*args, tenant=tenant, topk_sample_logprobs=topk_sample_logprobs,
                                  target_prompt_logprobs=target_prompt_logprobs,
                                  prompt_alt_tokens_k=prompt_alt_tokens_k, sequence_ids=sequence_ids)
        except (UserError, ValueError) as e:
            return failed(e)
        if self._mirrors is not None:
            self._mirrors.claim(req.future)
            return req.future
        with self._cv:
            req.seq = self.scheduler.take_seq()
        sampler.enqueue(req)
        return req.future

    def replay_sample(self, items: list[tuple]) -> None:
        """A follower runs the leader's sampler step: the same new requests (the leader's specs, seeds included),
        then the same admission and decode."""
        sampler = self.get_sampler()
        reqs = []
        for seq, uid, origin, spec, ids, tenant in items:
            fut = self._mirrors.executed(seq)
            fut.set_running_or_notify_cancel()
            reqs.append(sampler.request(uid, self._origins[origin], spec, ids, tenant, fut, seq))
        sampler.step(reqs)

    def forget(self, origins: list[int]) -> None:
        for o in origins:
            self._origins.pop(o, None)

    def replay(self, number: int, items: list[tuple]) -> None:
        """A follower runs the leader's round `number`: the same requests (the leader's payloads), in the same
        order, through the same code; each result also resolves this process's own call of that request."""
        rnd = Round(number)
        for kind, body, run, seq, batched in items:
            req = Request(kind, body, self._mirrors.executed(seq), run=run, seq=seq)
            (rnd.batch if batched else rnd.ops).append(req)
        self._execute(rnd)

    def _batching_window(self, window: float) -> None:
        """Other runs were active a moment ago but have nothing queued: usually tenants about to submit their next
        step. Waiting a little for them turns many small rounds into one batch. The wait lasts while requests keep
        arriving (each arrival allows another `_GAP_S`, up to `window`), and only while waiting has been paying
        off (`_window_score`, an average of whether a wait saw arrivals; re-probed every `_PROBE_ROUNDS` rounds),
        so one client driving several runs one after another does not pay for it. Called holding `_cv`."""
        if self._window_score < 0.25 and self._since_probe < _PROBE_ROUNDS:
            self._since_probe += 1
            return
        self._since_probe = 0
        start, deadline = self.scheduler.pushed, time.monotonic() + window
        while not self._stopping:
            seen = self.scheduler.pushed
            self._cv.wait(timeout=max(0.0, min(_GAP_S, deadline - time.monotonic())))
            if self.scheduler.pushed == seen or time.monotonic() >= deadline:
                break
        self._window_score = 0.8 * self._window_score + 0.2 * (self.scheduler.pushed > start)

    def _load(self) -> None:
        t0 = time.perf_counter()
        dtype = jnp.bfloat16 if self.config.dtype == "bfloat16" else jnp.float32
        # Experts split over an expert axis: ragged_dot, which XLA partitions by expert (the blocked form would sum
        # every device's gathered expert matrices across that axis).
        moe_impl = "ragged" if self.mesh.shape["expert"] > 1 else "auto"
        dec = load_decoder(self.path, dtype=dtype, shardings_fn=lambda st: state_shardings(st, self.mesh),
                           moe_impl=moe_impl)
        graphdef, self.base = nnx.split(dec, nnx.Param)
        self.graphdef = StaticGraph(graphdef)
        self.dtype = dtype
        self.sample_graphdef, self.sample_base, self.sample_dtype = self.graphdef, self.base, dtype
        self.attention = self.engine.attention_for(self.cfg)
        if self.config.sampler.backend == "jax":
            from tinker_jax.sampling import make_sampler

            want, self.sample_quant = self.config.sampler.dtype, self.config.sampler.quantize
            if self.sample_quant or (want is not None and jnp.dtype(want) != jnp.dtype(dtype)):
                # The decoder's compute dtype and int8 kernels are static in its graph: a second graph, and the
                # weights cast (and quantized) once, each placed by the rules. Full runs' snapshots are cast when
                # taken (`_cast`).
                self.sample_dtype = jnp.dtype(want or dtype).type
                dec.dtype = self.sample_dtype
                if self.sample_quant:  # quantizing makes the graph (int8 kernels, their scales) with the weights
                    graphdef, self.sample_base = self._cast(self.base, graph=True)
                else:
                    graphdef, self.sample_base = nnx.split(dec, nnx.Param)[0], self._cast(self.base)
                self.sample_graphdef = StaticGraph(graphdef)
                dec = merge(self.sample_graphdef, self.sample_base)
            self.sampler = make_sampler(self._sampler_base(dec), self.config.sampler, on_submit=self.wake,
                                        mesh=self.mesh)
            self.sampler.explain = self._explain
        log.info("base model %s loaded from %s in %.1f s (attention: %s)", self.name, self.path,
                 time.perf_counter() - t0, self.attention)
        if self.cfg.is_moe and (self.cfg.hf_config or {}).get("output_router_logits"):
            log.warning("%s: config.json sets output_router_logits, but the router's load-balancing loss is only "
                        "reported (metric router_aux_loss:mean), never added to a Tinker loss", self.name)

    def _sampler_base(self, dec):
        return _SamplerBase(self.cfg, self.path, dec, self.name)

    def get_sampler(self):
        """The sampler of this model (built at load; for vLLM, on first use)."""
        if self.load_error is not None or self.base is None:
            raise RuntimeError(f"base model {self.name} is not loaded"
                               + (f" ({type(self.load_error).__name__}; the server log has the details)"
                                  if self.load_error else ""))
        if self.sampler is None and self.config.sampler.backend != "jax":
            with self._sampler_lock:
                if self.sampler is None:
                    from tinker_jax.sampling import make_sampler

                    self.sampler = make_sampler(self._sampler_base(merge(self.graphdef, self.base)),
                                                self.config.sampler)
        return self.sampler

    # --- a round -------------------------------------------------------------------------------------------------

    def _execute(self, rnd: Round) -> None:
        self.stats["rounds"] += 1
        for req in rnd.ops + rnd.batch:
            req.round = rnd.number
        if self.load_error is not None:  # the server's fault (its model directory), reported as such
            for req in rnd.ops + rnd.batch:
                if begin(req.future):
                    req.future.set_exception(RuntimeError(
                        f"base model {self.name} could not be loaded ({type(self.load_error).__name__}; the server "
                        "log has the details)"))
            return
        optim = [r for r in rnd.ops if r.kind == "optim_step"]
        for req in rnd.ops:
            if req.kind != "optim_step":
                self._run_op(req)
        if optim:
            self._optim(optim)
        for forward_only in (False, True):
            reqs = [r for r in rnd.batch if r.body.forward_only == forward_only]
            if reqs:
                self._train(reqs, forward_only)

    def _run_op(self, req: Request) -> None:
        if not begin(req.future):
            return
        try:
            result = getattr(self, f"_op_{req.kind}")(req)
        except BaseException as e:  # noqa: BLE001 - delivered through the future
            for rank in list(self.pools):  # a slot write (create, load, unload) that consumed a pool's buffers
                self._lose_pool_if_consumed(rank, e)
            self._fail(req, e)
            return
        if isinstance(result, _OffLoop):
            try:
                self._io.submit(self._finish_off_loop, req, result.fn)
            except RuntimeError:  # the I/O thread is shut down (engine stopping): write here, nothing is lost
                self._finish_off_loop(req, result.fn)
        else:
            req.future.set_result(result)

    def _finish_off_loop(self, req: Request, fn) -> None:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - delivered through the future
            self._fail(req, e)
        else:
            req.future.set_result(result)

    def _fail(self, req: Request, e: BaseException) -> None:
        if not isinstance(e, UserError):
            log.error("%s on %s failed", req.kind, req.run or self.name, exc_info=e)
            e = self._explain(e)
        if not req.future.done():
            req.future.set_exception(e)

    def _explain(self, e: BaseException) -> BaseException:
        """A device failure on the leader of several processes is most often a lost process (a collective with it
        fails at once, before its heartbeat is missed): wait for the watchdog's verdict and report that, naming the
        process, instead of the collective's error."""
        procs = self._leader_procs
        if procs is None or not isinstance(e, jax.errors.JaxRuntimeError):
            return e
        gone = procs.wait_gone(procs.timeout_s + 3)
        return Unavailable(gone) if gone is not None else e

    def _run(self, req: Request) -> Run:
        run = self.runs.get(req.run)
        if run is None:
            if req.run in self.lost:
                raise RuntimeError(self.lost[req.run])
            raise NotFound(f"model_id: unknown model {req.run!r}")
        return run

    # --- runs ------------------------------------------------------------------------------------------------------

    def _pool(self, rank: int) -> AdapterPool:
        if rank not in self.pools:
            self.pools[rank] = AdapterPool(self.cfg, rank, self.mesh, self.config.lora.initial_slots,
                                           self.config.lora.max_slots + 1)
        return self.pools[rank]

    def check_rank(self, rank: int) -> None:
        """The largest LoRA rank served: config lora.max_rank, and never above the model's width (a wider adapter
        adds parameters and device memory, no expressiveness)."""
        limit = min(self.config.lora.max_rank, self.cfg.d_model)
        if rank > limit:
            raise UserError(f"lora_config.rank: {rank} exceeds this server's limit of {limit} (config "
                            f"lora.max_rank {self.config.lora.max_rank}, model width {self.cfg.d_model})")

    def _checkpoint(self, path: TinkerPath, field: str = "path") -> tuple[Path, dict]:
        """A checkpoint's directory and metadata, if it exists, can be loaded and belongs to this base model."""
        if path.kind not in RESTORABLE:
            raise UserError(f"{field}: {path} is a Hugging Face export for download; load a weights/ or "
                            "sampler_weights/ checkpoint")
        d = self.engine.checkpoint_dir(path)
        if not atomic.recover(d).is_dir():
            raise NotFound(f"{field}: checkpoint {path} not found")
        meta = checkpoints.read_meta(d)
        if meta.get("base_model") != self.name:
            raise UserError(f"{field}: checkpoint {path} is of base model {meta.get('base_model')!r}, "
                            f"not {self.name!r}")
        return d, meta

    def _op_create(self, req: Request) -> str:
        body: rq.CreateRun = req.body
        if req.run in self.runs:
            raise UserError(f"model_id: {req.run!r} already exists")
        spec, meta, full, optimizer = body.spec, None, body.spec is None, body.optimizer or "adamw"
        if body.from_path is not None:  # configured like the checkpoint's run
            _, meta = self._checkpoint(body.from_path)
            full = bool(meta.get("full_finetune", False))
            spec = None if full else LoraSpec.from_meta(meta)
            saved = meta.get("optimizer", "adamw")  # checkpoints from before Dimuon: AdamW
            optimizer = body.optimizer or saved  # asked for another: only with a fresh optimizer state
            if optimizer != saved and body.with_optimizer:
                raise UserError(f"optimizer_config.type: {optimizer!r} asked for, but checkpoint {body.from_path} "
                                f"holds {saved} optimizer state; load it without the optimizer state, or ask for "
                                f"{saved!r}")
            if optimizer != "adamw" and full:
                raise UserError(f"optimizer_config.type: {optimizer!r} is offered for LoRA runs only")
        run = Run(req.run, self.name, spec, owner=body.owner, created=time.time(),
                  user_metadata=dict(body.user_metadata or {}))
        if spec is not None:
            self.check_rank(spec.rank)
            run.slot = self._pool(spec.rank).alloc(req.run, spec)
        else:
            run.full = FullState.create(self.base, self.mesh)
        run.meta = {"base_model": self.name, "full_finetune": spec is None, "optimizer": optimizer,
                    **(spec.to_meta() if spec is not None else {"lora_rank": None})}
        self.runs[req.run] = run
        try:
            if body.from_path is not None:
                self._restore(run, body.from_path, body.with_optimizer)
            self.engine.registry.add_run(req.run, self.name, lora_rank=None if spec is None else spec.rank,
                                         full_finetune=spec is None, meta=run.meta,
                                         user_metadata=body.user_metadata, owner=body.owner, created=run.created)
        except BaseException:
            self._drop_run(run)
            raise
        self.engine.run_created(req.run, spec, optimizer)
        return req.run

    def _drop_run(self, run: Run) -> None:
        self.runs.pop(run.run_id, None)
        if run.slot is not None:
            pool = self.pools[run.spec.rank]
            pool.free(run.slot)
            run.slot = None
            if not pool.in_use():  # its device memory (4 copies of every slot) goes back
                del self.pools[run.spec.rank]
        run.full = None

    def _op_unload(self, req: Request) -> None:
        run = self.runs.get(req.run)
        if run is not None:
            self._drop_run(run)
        elif self.lost.pop(req.run, None) is None:
            # Not here (unloaded by an earlier request, or its creation failed): the id may already name a run
            # created again since, whose entry in the engine must stay.
            return None
        self.engine.run_unloaded(req.run)
        return None

    # --- training --------------------------------------------------------------------------------------------------

    def _started(self, reqs: list[Request]) -> list[tuple[Request, Run]]:
        """The requests that start now (not cancelled) with their runs; an unknown or lost run fails its request."""
        out = []
        for req in reqs:
            if not begin(req.future):
                continue
            try:
                out.append((req, self._run(req)))
            except (UserError, RuntimeError) as e:
                self._fail(req, e)
        return out

    def _train(self, reqs: list[Request], forward_only: bool) -> None:
        live = self._started(reqs)
        groups: list[list[tuple[Request, Run]]] = []
        lora = [x for x in live if x[1].is_lora]
        if lora:
            groups.append(lora)
        by_run: dict[str, list] = {}
        for x in live:
            if not x[1].is_lora:
                by_run.setdefault(x[1].run_id, []).append(x)
        groups += list(by_run.values())
        for group in groups:
            try:
                self._train_group(group, forward_only)
            except BaseException as e:  # noqa: BLE001 - a device failure fails this group's requests only
                log.error("training step on %s failed", self.name, exc_info=e)
                if not forward_only:  # first, so a client seeing the failure sees the state it leaves
                    self._drop_partial_grads([run for _, run in group], e)
                for req, _ in group:
                    self._fail(req, e)

    def _row_multiple(self) -> int:
        return batch_shards(self.mesh)

    def _train_group(self, group: list[tuple[Request, Run]], forward_only: bool) -> None:
        parts = [batching.Part(req.body.rows, run.spec.rank if run.is_lora else 0,
                               run.slot if run.is_lora else 0) for req, run in group]
        mbs = batching.plan(parts, self.config.max_tokens_per_batch, self._row_multiple())
        sharding = rows_sharding(self.mesh)
        outputs = []
        for mb in mbs:
            db = step.device_batch(mb.arrays(), sharding)
            ranks = [seg.rank for seg in mb.segments]
            if ranks:
                pools = [self.pools[r] for r in ranks]
                args = (tuple(p.weights for p in pools), tuple(p.scale for p in pools))
                if forward_only:
                    loss, met, lp = step.lora_forward(self.base, args[0], args[1], db, graphdef=self.graphdef,
                                                      layout=mb.layout, attention=self.attention)
                else:
                    grads, loss, met, lp = step.lora_forward_backward(
                        self.base, args[0], tuple(p.grads for p in pools), args[1], db, graphdef=self.graphdef,
                        layout=mb.layout, remat=self.config.remat, attention=self.attention)
                    for p, g in zip(pools, grads):
                        p.grads = g
            else:
                full = group[0][1].full
                if forward_only:
                    loss, met, lp = step.full_forward(full.params, db, graphdef=self.graphdef, layout=mb.layout,
                                                      attention=self.attention)
                else:
                    full.grads, loss, met, lp = step.full_forward_backward(
                        full.params, full.grads, db, graphdef=self.graphdef, layout=mb.layout,
                        remat=self.config.remat, attention=self.attention)
            outputs.append((mb, loss, met, lp))
            self.stats["micro_batches"] += 1
            self.stats["rows"] += mb.shape[0]
        # One host sync after every micro-batch is queued; then split each row's results back to its request.
        # Rows may live on other processes' devices: gathered (every process, the same point of the same round).
        fetched = distributed.fetch([(loss, met, lp) for _, loss, met, lp in outputs])
        lps: list[dict[int, np.ndarray]] = [{} for _ in group]
        sums: list[dict[str, float]] = [{} for _ in group]
        router: list[np.ndarray] = [0.0 for _ in group]  # MoE: each request's summed router statistics [2,E]
        for (mb, *_), (loss, met, lp) in zip(outputs, fetched):
            for p, d, r, n in mb.rows:
                lps[p][d] = np.asarray(lp[r, :n], np.float32)
                m = sums[p]
                m["loss:sum"] = m.get("loss:sum", 0.0) + float(loss[r])
                name = group[p][0].body.rows.loss_fn
                for k, v in met.get(name, {}).items():
                    m[k] = m.get(k, 0.0) + float(v[r])
                if step.ROUTER_STATS in met:
                    router[p] = router[p] + np.asarray(met[step.ROUTER_STATS][r], np.float64)
        if self.cfg.is_moe:  # the load-balancing loss of each request's tokens, as transformers computes it
            for p, (req, _) in enumerate(group):
                sums[p]["router_aux_loss:mean"] = moe.balance_from_stats(router[p], self.cfg.n_moe_layers,
                                                                         req.body.rows.n_tokens)
        for p, (req, run) in enumerate(group):
            if not forward_only:
                run.pending += 1
            n = len(req.body.rows.tokens)
            out = tt.ForwardBackwardOutput(
                loss_fn_output_type="ArrayRecord",
                loss_fn_outputs=[{"logprobs": tt.TensorData.from_numpy(lps[p][d])} for d in range(n)],
                metrics=sums[p])
            req.future.set_result(out)
        try:
            self._io.submit(self.engine.registry.touch_runs, [req.run for req, _ in group])  # bookkeeping, off the loop
        except RuntimeError:  # shutting down
            pass
        self.stats["requests_batched"] += len(group)
        self.stats["batches"] += 1
        self.stats["max_requests_per_batch"] = max(self.stats["max_requests_per_batch"], len(group))

    def _drop_partial_grads(self, runs: list[Run], error: BaseException) -> None:
        """A failed forward_backward group may have added part of its batch (earlier micro-batches) to its runs'
        accumulators, and a failed call may have consumed a pool's donated accumulator. Those runs' accumulated
        gradients are cleared and their next optim_step fails saying why, rather than stepping on a partial (or
        doubled, after a retry) gradient. Runs outside the group keep theirs unless their pool's buffers are gone."""
        why = (f"the gradient accumulated since the last optim_step was dropped: a training step on the server "
               f"failed ({type(error).__name__}); run forward_backward again before optim_step")
        hit = {run.run_id: run for run in runs}
        for rank, pool in self.pools.items():
            if any(x.is_deleted() for x in jax.tree.leaves(pool.grads)):
                pool.grads = jax.tree.map(lambda x: jax.device_put(jnp.zeros(x.shape, x.dtype), x.sharding),
                                          pool.weights)
                hit.update((r.run_id, r) for r in self.runs.values() if r.is_lora and r.spec.rank == rank)
        for run in hit.values():
            if run.is_lora:
                if not self.pools[run.spec.rank].deleted():
                    self.pools[run.spec.rank].zero_grads([run.slot])
            elif run.full is not None:
                run.full.grads = jax.tree.map(jnp.zeros_like, run.full.params)
            if run.pending:  # forward_backward calls that reported success lost their gradient: say so
                run.grads_lost = why
            run.pending = 0

    def _lose_pool_if_consumed(self, rank: int, error: BaseException) -> None:
        """A failed call that consumed a pool's donated buffers (an optimizer step, a slot write) leaves nothing to
        recover: its runs end (each later request says why), and the rank starts over with an empty pool."""
        pool = self.pools.get(rank)
        if pool is None or not pool.deleted():
            return
        why = (f"this model's training state was lost when a device call failed on the server "
               f"({type(error).__name__}); create it again from its last checkpoint")
        for run in [r for r in self.runs.values() if r.is_lora and r.spec.rank == rank]:
            self.runs.pop(run.run_id, None)
            self.lost[run.run_id] = why
        del self.pools[rank]
        log.error("engine worker %s: the rank-%d adapter pool was consumed by a failed call; its runs are lost",
                  self.name, rank)

    def _optim(self, reqs: list[Request]) -> None:
        by_rank: dict[tuple[int, str], list[tuple[Request, Run]]] = {}
        for req, run in self._started(reqs):
            if req.body.hp.kind != run.optimizer:
                self._fail(req, UserError(
                    f"optim_step: this model was created with the {run.optimizer} optimizer; pass "
                    f"{'DimuonParams' if run.optimizer == 'dimuon' else 'AdamParams'}, not {req.body.hp.kind} ones"))
                continue
            if run.grads_lost is not None:
                why, run.grads_lost = run.grads_lost, None
                self._fail(req, RuntimeError(why))
                continue
            if run.is_lora:
                by_rank.setdefault((run.spec.rank, run.optimizer), []).append((req, run))
            else:
                try:
                    full = run.full
                    (full.params, full.grads, full.mu, full.nu, full.count, gnorm) = step.full_optim_step(
                        full.params, full.grads, full.mu, full.nu, full.count, req.body.hp.array())
                    self._optim_done(req, run, float(distributed.fetch(gnorm)))
                except BaseException as e:  # noqa: BLE001
                    if any(x.is_deleted() for x in jax.tree.leaves((run.full.params, run.full.mu))):
                        self.runs.pop(run.run_id, None)  # its donated weights are gone: nothing to recover
                        self.lost[run.run_id] = (f"this model's training state was lost when an optimizer step "
                                                 f"failed on the server ({type(e).__name__}); create it again "
                                                 "from its last checkpoint")
                    self._fail(req, e)
        for (rank, kind), items in by_rank.items():  # one call per pool and optimizer
            pool = self.pools[rank]
            k = batching.bucket(len(items), 1)
            slots = np.full(k, NULL_SLOT, np.int32)
            hps = np.zeros((k, items[0][0].body.hp.array().size), np.float32)
            valid = np.zeros(k, bool)
            for i, (req, run) in enumerate(items):
                slots[i], hps[i], valid[i] = run.slot, np.asarray(req.body.hp.array()), True
            fn = step.lora_optim_step if kind == "adamw" else partial(step.lora_dimuon_step, rank=rank)
            try:
                (pool.weights, pool.grads, pool.mu, pool.nu, pool.count, gnorm) = fn(
                    pool.weights, pool.grads, pool.mu, pool.nu, pool.count, slots, hps, valid)
                gnorm = distributed.fetch(gnorm)
            except BaseException as e:  # noqa: BLE001
                self._lose_pool_if_consumed(rank, e)
                for req, _ in items:
                    self._fail(req, e)
                continue
            for i, (req, run) in enumerate(items):
                self._optim_done(req, run, float(gnorm[i]))

    def _optim_done(self, req: Request, run: Run, gnorm: float) -> None:
        run.pending = 0
        if not math.isfinite(gnorm):  # the step left the weights and moments as they were (step._slots_step)
            self._fail(req, UserError(
                f"optim_step: the norm of the gradient accumulated since the last optim_step is not finite "
                f"({gnorm}); the step was not applied and that gradient was dropped. Look for loss inputs that "
                "overflow, e.g. importance ratios exp(target logprobs - sampling logprobs) with sampling logprobs "
                "far below the model's"))
            return
        run.step += 1
        self.stats["optim_steps"] += 1
        req.future.set_result(tt.OptimStepResponse(metrics={"grad_norm:mean": gnorm,
                                                            "learning_rate:mean": req.body.hp.learning_rate}))

    # --- checkpoints and snapshots ---------------------------------------------------------------------------------

    def _state_of(self, run: Run, with_optimizer: bool):
        """(weights, opt or None) of a run as checkpoints store them; copy them (device_get) before the next step
        of the run, which may donate full fine-tuning buffers."""
        if run.is_lora:
            pool = self.pools[run.spec.rank]
            weights = pool.read(run.slot, run.spec).weights
            return weights, (pool.read_opt(run.slot, run.spec) if with_optimizer else None)
        return run.full.params.to_pure_dict(), (run.full.opt() if with_optimizer else None)

    def _op_save(self, req: Request):
        """The state is captured here, in the run's order; the disk write happens off the loop (the I/O thread),
        so other runs keep training meanwhile. The future resolves once the checkpoint is committed and listed;
        later requests on the same path wait for it (engine path order)."""
        body: rq.Save = req.body
        run = self._run(req)
        if body.path is not None and not body.overwrite:  # on the path's turn: earlier saves on it are listed now
            self._settled(lambda: self._refuse_existing(body.path))
        if body.export:
            return self._export(run, body)
        snapshot = (self._shared(req, self._snapshot(run, None if body.path is None else str(body.path)))
                    if body.snapshot else None)
        if body.path is None:
            return None, snapshot
        meta = {**run.meta, "step": run.step, "kind": KINDS[body.path.kind]}
        path, registry, d = body.path, self.engine.registry, self.engine.checkpoint_dir(body.path)
        record = self._new_record(run, body)
        if self.engine.procs is not None:
            self._save_everywhere(req, run, meta, record)
            return str(path), snapshot
        # Host copies: the device memory is free again at once, and the write does not race later steps.
        self._writes.acquire()  # at most _MAX_WRITES host copies wait for the disk; beyond, the loop waits here
        try:
            weights, opt = jax.device_get(self._state_of(run, body.with_optimizer))
            need = self._reserve_quota(run, body, (weights, opt))
        except BaseException:
            self._writes.release()
            raise

        def write():
            try:
                # The record commits with the files; the registry row follows it (the index is rebuilt from
                # records if it is lost between the two).
                registry.add_checkpoint_record(path, checkpoints.save(d, weights=weights, opt=opt, meta=meta,
                                                                      record=record))
            finally:
                self._writes.release()
                self._release_quota(run, need)
            return str(path), snapshot

        return _OffLoop(write)

    def _refuse_existing(self, path: TinkerPath) -> None:
        if self.engine.registry.get_checkpoint(path) is not None:
            raise UserError(f"path: checkpoint {path} already exists (save under another name, or overwrite)")

    def _settled(self, check):
        """A decision of the registry's: on several processes the leader's, learnt by every process
        (`Processes.settle`); else `check()` here."""
        procs = self.engine.procs
        return check() if procs is None else procs.settle(check)

    @staticmethod
    def _new_record(run: Run, body: rq.Save) -> dict:
        """The record of the checkpoint `body` saves of `run` (engine.checkpoints.new_record), created now."""
        now = time.time()
        return checkpoints.new_record(
            body.path, owner=run.owner, created=now, public=False, step=run.step,
            expires=now + body.ttl_seconds if body.ttl_seconds else None, user_metadata=body.user_metadata,
            run={**run.meta, "created": run.created, "user_metadata": run.user_metadata})

    def _export(self, run: Run, body: rq.Save):
        """save_weights_external: the run's weights as Hugging Face files, a checkpoint of kind external_weights: a
        LoRA run's PEFT adapter (adapter_config.json, adapter_model.safetensors: peft loads it onto the base model),
        a full run's merged model (config, safetensors, the base model's tokenizer files). Captured here in the
        run's order (host copies), written off the loop like any save; on several processes, see
        `_export_everywhere`. -> (path, size in bytes)."""
        path, registry, d = body.path, self.engine.registry, self.engine.checkpoint_dir(body.path)
        record = self._new_record(run, body)
        if self.engine.procs is not None:
            return self._export_everywhere(run, body, record)
        self._writes.acquire()
        try:
            weights, files = self._export_files(run)
            state = distributed.fetch(weights)  # host copies
            files = files(state)
            need = self._reserve_quota(run, body, state)
        except BaseException:
            self._writes.release()
            raise

        def write():
            try:
                rec = checkpoints.save_files(d, files, record)
                registry.add_checkpoint_record(path, rec)
            finally:
                self._writes.release()
                self._release_quota(run, need)
            return str(path), rec.get("size_bytes")

        return _OffLoop(write)

    def _export_files(self, run: Run) -> tuple[Any, Any]:
        """(the run's weights as they are on the device: global arrays, a function of their host copy -> a function
        writing their Hugging Face files into a directory)."""
        if run.is_lora:
            live = self.pools[run.spec.rank].read(run.slot, run.spec)

            def peft(host):
                adapter = Adapter(live.spec, host)
                return lambda tmp: export_peft_adapter(adapter, self.cfg, tmp, self.name)
            return live.weights, peft
        return run.full.params, lambda host: lambda tmp: export_merged_hf(merge(self.graphdef, host), tmp, self.path)

    def _export_everywhere(self, run: Run, body: rq.Save, record: dict):
        """save_weights_external on several processes: the leader checks the quota (the global arrays' sizes) and
        every process learns the outcome (`Processes.settle`); then every process takes part in gathering the
        weights, leaf by leaf (`distributed.fetch`: collectives reached at the same point of the log), the leader
        keeping the host copy and the others dropping each leaf once gathered (a full run's model is whole on the
        leader's host only); the leader writes and commits the files, on the loop, and every process learns the
        outcome, as `_save_everywhere` does. The files are the gathered global weights: the same as one process's
        export of the same weights. -> (path, size in bytes)."""
        procs, path, d = self.engine.procs, body.path, self.engine.checkpoint_dir(body.path)
        weights, files = self._export_files(run)
        need = procs.settle(lambda: self._reserve_quota(run, body, weights)) or 0
        try:
            if procs.leader:
                files = files(distributed.fetch(weights))
            else:
                for leaf in jax.tree.leaves(weights):  # the same leaves, in the same order, as the leader's fetch
                    distributed.fetch(leaf)

            def commit():
                rec = checkpoints.save_files(d, files, record)
                self.engine.registry.add_checkpoint_record(path, rec)
                return rec.get("size_bytes")

            return str(path), procs.settle(commit, share=True)
        finally:
            self._release_quota(run, need)

    def _save_everywhere(self, req: Request, run: Run, meta: dict, record: dict) -> None:
        """A save on several processes: every process writes its own shards of the run's state (global arrays, no
        host gather) into one staging directory named alike everywhere, on the loop, since Orbax's barriers span
        the processes and every process must reach them in the same order. The leader alone checks the quota and
        commits (record, rename, registry): the checkpoint is listed only once every process's shards are
        written, and every process learns each outcome (`Processes.settle`)."""
        body: rq.Save = req.body
        procs, d = self.engine.procs, self.engine.checkpoint_dir(body.path)
        weights, opt = self._state_of(run, body.with_optimizer)
        need = procs.settle(lambda: self._reserve_quota(run, body, (weights, opt))) or 0
        try:
            tmp = atomic.staging(d, procs.token("save", self.name, req.seq))
            if procs.leader:  # Orbax's primary process creates `tmp` itself; its parent must exist
                d.parent.mkdir(parents=True, exist_ok=True)
            checkpoints.write_staged(tmp, weights=weights, opt=opt, meta=meta)
            procs.settle(lambda: self.engine.registry.add_checkpoint_record(
                body.path, checkpoints.commit_staged(tmp, d, record)))
        finally:
            self._release_quota(run, need)

    def _release_quota(self, run: Run, need: int) -> None:
        """A write that `_reserve_quota` counted `need` bytes for is recorded in the registry, or failed (on several
        processes, a follower's `need` is 0: the leader alone reserved)."""
        self.engine.quota.release(run.owner, need)

    def _reserve_quota(self, run: Run, body: rq.Save, state) -> int:
        """Refuse a save of `state` (host copies, or global arrays) that would take the run's owner past config
        checkpoint_quota_bytes (the engine's one ledger: on disk, plus every writer's writes not yet recorded, less
        the checkpoint it replaces). Returns the bytes it is counted for until recorded."""
        if self.engine.quota.quota is None or run.owner is None:
            return 0
        need = sum(int(x.nbytes if hasattr(x, "nbytes") else np.asarray(x).nbytes) for x in jax.tree.leaves(state))
        replaced = self.engine.registry.get_checkpoint(body.path)
        return self.engine.quota.reserve(run.owner, need, (replaced.size_bytes or 0) if replaced else 0,
                                         what=f"path: saving {body.path}")

    def _cast(self, params, graph: bool = False):
        """Weights in the sampler's dtype, their projections int8 where sampler.quantize asks (a copy, even when
        they are theirs: never donated by a later step); with `graph` (quantizing only), (the graph they go with,
        weights)."""
        assert self.sample_quant or not graph, "without quantizing, the graph is the training graph's in a dtype"
        if self.sample_quant:  # new int8 kernels from the weights as they are: no full-precision copy on the way
            dec = merge(self.graphdef, params)
            dec.dtype = self.sample_dtype
            quant.quantize_blocks(dec, self.sample_quant)
            graphdef, params = nnx.split(dec, nnx.Param)
        # jnp.array(..., copy=True): astype to an array's own dtype returns that array (which a later optimizer
        # step of a full run would donate under the snapshot).
        out = jax.tree.map(lambda x: jnp.array(x, dtype=self.sample_dtype if jnp.issubdtype(x.dtype, jnp.floating)
                                               else x.dtype, copy=True), params)
        if self.sample_quant:  # the new arrays placed as the rules place them (scales like their kernels' columns)
            out = jax.device_put(out, state_shardings(out, self.mesh))
        return (graphdef, out) if graph else out

    def _snapshot(self, run: Run, name: str | None) -> WeightSnapshot:
        if run.is_lora:
            adapter = self.pools[run.spec.rank].read(run.slot, run.spec)
            return WeightSnapshot(self.cfg, self.sample_graphdef, self.sample_base, adapter, name or "", self.name)
        # A copy: optimizer steps donate the run's own arrays, never the snapshot's.
        params = self._cast(run.full.params) if self.sample_graphdef is not self.graphdef else \
            jax.tree.map(jnp.copy, run.full.params)
        return WeightSnapshot(self.cfg, self.sample_graphdef, params, None, name or "", self.name)

    def _restore(self, run: Run, path: TinkerPath, with_optimizer: bool) -> dict:
        d, meta = self._checkpoint(path)
        saved = meta.get("optimizer", "adamw")
        if with_optimizer and saved != run.optimizer:
            raise UserError(f"path: checkpoint {path} holds {saved} optimizer state; this model trains with "
                            f"{run.optimizer} (load its weights without the optimizer state, or create the model "
                            f"from the checkpoint)")
        if run.is_lora:
            try:
                spec = LoraSpec.from_meta(meta)
            except (KeyError, TypeError, ValueError):
                raise UserError(f"path: checkpoint {path} holds full weights; this model is a LoRA run") from None
            if spec.rank != run.spec.rank or spec.targets != run.spec.targets:
                raise UserError(f"path: checkpoint {path} does not match this model: a rank-{spec.rank} adapter of "
                                f"{list(spec.targets)}, this model is rank {run.spec.rank} on {list(run.spec.targets)}")
            pool = self.pools[run.spec.rank]
            like = pool.read(run.slot, run.spec).weights
            like_opt = pool.read_opt(run.slot, run.spec) if with_optimizer else None
            weights, opt, meta = checkpoints.restore(d, like, like_opt)
            # The checkpoint's alpha is kept: same rank and projections, scale as trained.
            spec = LoraSpec(run.spec.rank, spec.alpha, run.spec.targets, run.spec.seed)
            pool.write(run.slot, spec, weights, opt)
            run.spec = spec
            run.meta.update(spec.to_meta())  # later saves record the scale it now trains with
            self.engine.run_created(run.run_id, spec)
        else:
            if not meta.get("full_finetune", False):
                raise UserError(f"path: checkpoint {path} is a LoRA adapter; this model is a full fine-tuning run")
            like = run.full.params.to_pure_dict()
            like_opt = run.full.opt() if with_optimizer else None
            weights, opt, meta = checkpoints.restore(d, like, like_opt)
            run.full.set(weights, opt)
        run.step = int(meta.get("step", 0)) if with_optimizer else 0
        run.pending = 0
        return meta

    def _op_change(self, req: Request):
        """Several processes: a checkpoint's deletion or new record fields, once every process has finished what
        came before in the log (a load of the same files), made by process 0 alone (its files, its registry)."""
        procs = self.engine.procs
        procs.barrier(procs.token("change", self.name, req.seq))
        return procs.settle(lambda: self.engine.change_checkpoint(req.body), share=True)

    def _op_load(self, req: Request):
        body: rq.Load = req.body
        run = self._run(req)
        self._restore(run, body.path, body.with_optimizer)
        return tt.LoadWeightsResponse(path=str(body.path), model_id=req.run)

    def _op_open_snapshot(self, req: Request) -> WeightSnapshot:
        return self._shared(req, self._open_snapshot(req.body))

    def _shared(self, req: Request, snap: WeightSnapshot) -> WeightSnapshot:
        """Several processes: a snapshot named by the request that made it, so that the leader's sample steps can
        name it to the followers. A follower keeps it until the leader's copy is gone (`forget`)."""
        procs = self.engine.procs
        if procs is None:
            return snap
        snap = dataclasses.replace(snap, origin=req.seq)
        if procs.leader:
            weakref.finalize(snap, self._forgets.append, req.seq)
        else:
            self._origins[req.seq] = snap
        return snap

    def _open_snapshot(self, body: rq.OpenSnapshot) -> WeightSnapshot:
        if body.path is None:
            return WeightSnapshot(self.cfg, self.sample_graphdef, self.sample_base, None, "", self.name)
        d, meta = self._checkpoint(body.path, "model_path")
        if meta.get("full_finetune", False):
            weights, _, _ = checkpoints.restore(d, _full_like(self.base))
            params = jax.tree.map(lambda x: x, self.base)  # a State of the same structure, then its own weights
            params.replace_by_pure_dict(weights)
            if self.sample_graphdef is not self.graphdef:
                params = self._cast(params)
            return WeightSnapshot(self.cfg, self.sample_graphdef, params, None, str(body.path), self.name)
        spec = LoraSpec.from_meta(meta)
        like = _lora_like(self.cfg, spec, self.mesh)
        weights, _, _ = checkpoints.restore(d, like)
        return WeightSnapshot(self.cfg, self.sample_graphdef, self.sample_base, Adapter(spec, weights),
                              str(body.path), self.name)

    # --- introspection (tests, stats) ------------------------------------------------------------------------------

    def run_state(self, run_id: str) -> dict:
        """Host copies of a run's weights, gradient accumulator and Adam state (tests and debugging; call from the
        worker thread or when the worker is idle)."""
        run = self.runs.get(run_id)
        if run is None:
            raise NotFound(f"model_id: unknown model {run_id!r}")
        to_np = lambda t: jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(t))  # noqa: E731
        if run.is_lora:
            pool = self.pools[run.spec.rank]
            opt = pool.read_opt(run.slot, run.spec)
            return {"weights": to_np(pool.read(run.slot, run.spec).weights),
                    "grads": to_np(pool.read_grads(run.slot, run.spec)), "mu": to_np(opt["mu"]),
                    "nu": to_np(opt["nu"]), "count": int(opt["count"]), "step": run.step, "pending": run.pending,
                    "spec": run.spec, "slot": run.slot, "compute_dtype": self.dtype}
        f = run.full
        return {"weights": to_np(f.params.to_pure_dict()), "grads": to_np(f.grads.to_pure_dict()),
                "mu": to_np(f.mu.to_pure_dict()), "nu": to_np(f.nu.to_pure_dict()), "count": int(f.count),
                "step": run.step, "pending": run.pending, "spec": None, "slot": None, "compute_dtype": self.dtype}


def _full_like(base: nnx.State) -> dict:
    """Restore targets for a full fine-tuning checkpoint: fp32, placed like the base weights."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
                        base.to_pure_dict())


def _lora_like(cfg: ModelConfig, spec: LoraSpec, mesh) -> dict:
    shapes = lora_math.targeted(lora_math.shapes(cfg, spec.rank), spec)
    abstract = {n: {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in w.items()} for n, w in shapes.items()}
    sh = pool_shardings(abstract, mesh)
    return {n: {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh[n][k]) for k, s in w.items()}
            for n, w in abstract.items()}


class _OffLoop:
    """An op result that finishes on the worker's I/O thread: `fn()` gives the request's result."""

    def __init__(self, fn):
        self.fn = fn


class _SamplerBase:
    """What sampling.make_sampler reads of a base model."""

    def __init__(self, cfg, path, decoder, name):
        self.cfg, self.path, self.decoder, self.name = cfg, path, decoder, name


def _begun(rnd: Round) -> Round:
    """The round less its cancelled requests, the others started (no longer cancellable)."""
    out = Round(rnd.number)
    out.ops = [r for r in rnd.ops if begin(r.future)]
    out.batch = [r for r in rnd.batch if begin(r.future)]
    return out


def _wire(req) -> tuple:
    """A sampler request as the leader publishes it (what `replay_sample` rebuilds)."""
    return (req.seq, req.uid, req.snapshot.origin, req.spec, req.sequence_ids, req.tenant)


def _items(rnd: Round) -> list[tuple]:
    """A round as the leader publishes it: each request's kind, payload, run and place in the log; barriers first,
    then the batch, each in the round's order (what `replay` rebuilds)."""
    return [(r.kind, r.body, r.run, r.seq, batched) for batched, reqs in ((False, rnd.ops), (True, rnd.batch))
            for r in reqs]
