"""Sampler: a background thread that serves sampling requests with continuous batching.

Rows. The KV cache has a fixed number of rows B (the batch bucket) and S = max_seq_len + 1 slots. Each row
holds one sample of one request. A new request is prefilled once (prompt[:-1], padded to a length bucket,
batched with other new requests of the same snapshot and bucket), its cache row is copied into as many free
rows as it has samples (`num_samples` shares one prefill; samples that find no free row wait, holding the
prefill result, and take rows as they free up), and the rows join the running decode loop at once. A row's
first decode step feeds the last prompt token, so the prefill never needs logits unless prompt logprobs were
asked for. Finished rows leave and free their slot at the end of the decode call that finished them.

Snapshots. A request names an immutable WeightSnapshot. A decode call runs one snapshot's rows (the others
write to the cache's scratch slot and keep their state); when rows of several snapshots are resident, calls
alternate between them round-robin. Nothing here prevents a later per-row adapter batch.

Threading. `submit` only validates and enqueues; everything else (device calls, row state) belongs to the
loop thread. A bad request fails only its own future. A device error fails the requests it touched.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tinker import types

from tinker_jax.models.config import ModelConfig
from tinker_jax.models.decoder import KVCache
from tinker_jax.sampling.base import SamplerBase
from tinker_jax.sampling import kernels, response
from tinker_jax.sampling.params import Limits, RequestSpec
from tinker_jax.sampling.snapshot import WeightSnapshot
from tinker_jax.sampling.stops import StopStrings, Tokenizer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    uid: int
    snapshot: WeightSnapshot
    spec: RequestSpec
    future: Future
    sequence_ids: list[str]
    stopper: StopStrings | None
    results: list[Any] = field(default_factory=list)
    placed: int = 0  # samples given a row so far
    done: int = 0
    kv: tuple | None = None  # (k, v, row) of its prefill, held until every sample has a row
    prompt_lp: np.ndarray | None = None
    topk: Any = None


@dataclass(eq=False)
class _Row:
    req: _Request
    sample: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


def _snapshot_cfg(snapshot) -> ModelConfig | None:
    cfg = getattr(snapshot, "cfg", None)
    return cfg if cfg is not None else getattr(getattr(snapshot, "base", None), "cfg", None)


def _snapshot_key(snapshot) -> int:
    """Round-robin order between resident snapshots (WeightSnapshot.uid grows with creation)."""
    uid = getattr(snapshot, "uid", None)
    return uid if isinstance(uid, int) else id(snapshot)


def _default_lengths(max_seq_len: int, start: int = 16) -> tuple[int, ...]:
    out, n = [], start
    while n < max_seq_len:
        out.append(n)
        n *= 2
    return tuple(out) + (max_seq_len,)


class Sampler(SamplerBase):
    """Continuous-batching sampler for one model architecture (any number of weight snapshots).

    Args:
      cfg: the model config every snapshot must match.
      eos_token_ids: ids that stop generation when a request's `stop` is None (default: cfg.eos_token_id).
      max_batch: rows B of the decode batch / KV cache.
      max_seq_len: context per row (prompt + max_tokens); the cache has max_seq_len + 1 slots.
      prefill_lengths: length buckets for prefill (prompt length - 1 is padded up to one of them).
      prefill_batches: row buckets for one prefill call.
      prefill_token_budget: at most this many (rows x bucket length) tokens per prefill call.
      decode_steps: decode steps per device call (one host round trip).
      decode_unroll: unroll the decoder's layer loop inside a decode step.
      decode_lengths: cache-length buckets a decode call attends over (the smallest one that holds every
        running row's positions for the call; one compiled decode program each). Default: powers of two from
        256, then max_seq_len.
      max_num_samples: cap on num_samples per request.
      max_topk_prompt_logprobs: cap on topk_prompt_logprobs (a static width of the prefill kernel).
      max_stop_tokens: cap on stop token ids per request (a static width of the decode kernel).
      tokenizer: anything with `decode(list[int]) -> str`; needed for stop strings.
      cache_dtype: KV cache dtype.
    """

    _thread_name = "tinker-jax-sampler"

    def __init__(self, cfg: ModelConfig, eos_token_ids: Sequence[int] | int | None = None, *, max_batch: int = 8,
                 max_seq_len: int = 4096, prefill_lengths: Sequence[int] | None = None,
                 prefill_batches: Sequence[int] = (1, 2, 4, 8), prefill_token_budget: int = 16384,
                 decode_steps: int = 8, decode_unroll: bool = False, decode_lengths: Sequence[int] | None = None, max_num_samples: int = 128, max_topk_prompt_logprobs: int = 20,
                 max_stop_tokens: int = 16, tokenizer: Tokenizer | None = None, cache_dtype=jnp.float32):
        if eos_token_ids is None:
            eos_token_ids = cfg.eos_token_id
        if eos_token_ids is None:
            eos_token_ids = ()
        elif np.ndim(eos_token_ids) == 0:
            eos_token_ids = (eos_token_ids,)
        self.cfg = cfg
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.max_batch = int(max_batch)
        self.max_seq_len = int(max_seq_len)
        lengths = sorted(set(int(n) for n in (prefill_lengths or _default_lengths(self.max_seq_len))))
        if lengths[-1] < self.max_seq_len - 1:  # prefill covers prompt[:-1], at most max_seq_len - 2 tokens
            lengths.append(self.max_seq_len)
        if lengths[-1] > self.max_seq_len + 1 or lengths[0] <= 0:
            raise ValueError(f"prefill_lengths: buckets must lie in [1, max_seq_len + 1], got {lengths}")
        self.prefill_lengths = tuple(lengths)
        self.prefill_batches = tuple(sorted(set(min(int(b), self.max_batch) for b in prefill_batches)))
        self.prefill_token_budget = int(prefill_token_budget)
        self.decode_steps = int(decode_steps)
        self.decode_unroll = bool(decode_unroll)
        views = decode_lengths or _default_lengths(self.max_seq_len, start=256)
        self.decode_lengths = tuple(sorted(set(min(int(n), self.max_seq_len) for n in views) | {self.max_seq_len}))
        self.max_topk = int(max_topk_prompt_logprobs)
        self.max_stop_tokens = int(max_stop_tokens)
        self.tokenizer = tokenizer
        self.cache_dtype = cache_dtype
        self.limits = Limits(cfg.vocab_size, self.max_seq_len, int(max_num_samples), self.max_topk,
                             self.max_stop_tokens, tokenizer is not None)
        if len(self.eos_token_ids) > self.max_stop_tokens:
            raise ValueError(f"max_stop_tokens: {self.max_stop_tokens} is fewer than the {len(self.eos_token_ids)} "
                             "EOS ids")

        self._cv = threading.Condition()
        self._incoming: list[_Request] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._uids = itertools.count()
        # Loop-thread state.
        self._pending: collections.deque[_Request] = collections.deque()
        self._deferred: collections.deque[_Request] = collections.deque()
        self._rows: list[_Row | None] = [None] * self.max_batch
        self._last_snapshot_uid = -1
        self._reset_device_state()
        self.stats = collections.Counter()

    # ------------------------------------------------------------------------------------------- public

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop thread; requests not yet finished fail with RuntimeError."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._cv:
            leftover, self._incoming = self._incoming, []
        if thread is None or not thread.is_alive():
            self._fail_in_flight(RuntimeError("sampler: stopped"), extra=leftover, pending=True)

    def submit(self, snapshot: WeightSnapshot | Any, prompt_tokens: Sequence[int], params: types.SamplingParams,
               num_samples: int = 1, include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, *,
               sequence_ids: Sequence[str] | None = None) -> Future:
        """Enqueue one request; the Future resolves to a tinker.types.SampleResponse.

        `snapshot` is a WeightSnapshot or any object with `graphdef`, `frozen` and `trainable` (and `cfg` or
        `base.cfg`, checked when present); requests are batched by snapshot identity, so keep it immutable.
        Invalid requests get a future that already holds a ValueError naming the field (never raised here).
        `sequence_ids` (default "<request>:<i>") become SampledSequence.sequence_id, in sample order.
        """
        fut: Future = Future()
        uid = next(self._uids)
        try:
            if not all(hasattr(snapshot, a) for a in ("graphdef", "frozen", "trainable")):
                raise ValueError(f"snapshot: expected a WeightSnapshot (graphdef, frozen, trainable), got "
                                 f"{type(snapshot).__name__}")
            cfg = _snapshot_cfg(snapshot)
            if cfg is not None and cfg != self.cfg:
                raise ValueError(f"snapshot: model config {cfg.family}/d_model={cfg.d_model} does not match this "
                                 f"sampler's {self.cfg.family}/d_model={self.cfg.d_model}")
            spec, ids = self._request(uid, prompt_tokens, params, num_samples, include_prompt_logprobs,
                                      topk_prompt_logprobs, sequence_ids)
        except ValueError as e:
            fut.set_exception(e)
            return fut
        stopper = StopStrings(self.tokenizer, spec.stop_strings) if spec.stop_strings else None
        req = _Request(uid, snapshot, spec, fut, ids, stopper, results=[None] * spec.num_samples)
        with self._cv:
            if self._stopping:
                fut.set_exception(RuntimeError("sampler: stopped"))
                return fut
            self._incoming.append(req)
            self._cv.notify_all()
        if self._thread is None:
            self.start()
        return fut

    # --------------------------------------------------------------------------------------- loop thread

    def _reset_device_state(self) -> None:
        B, NS = self.max_batch, self.max_stop_tokens
        self._cache = KVCache.init(self.cfg, B, self.max_seq_len + 1, self.cache_dtype)
        self._dyn = dict(tok=np.zeros(B, np.int32), pos=np.zeros(B, np.int32), n_gen=np.zeros(B, np.int32),
                         live=np.zeros(B, bool))
        self._par = dict(max_tokens=np.ones(B, np.int32), temperature=np.zeros(B, np.float32),
                         top_k=np.zeros(B, np.int32), top_p=np.ones(B, np.float32), seed=np.zeros((B, 2), np.uint32),
                         sample=np.zeros(B, np.int32), stop_ids=np.full((B, NS), -1, np.int32))

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._incoming or self._pending or self._deferred
                           or any(r is not None for r in self._rows)):
                    self._cv.wait()
                if self._stopping:
                    break
                self._pending.extend(self._incoming)
                self._incoming = []
            try:
                self._admit()
                self._decode_round()
            except Exception as e:  # a device failure: fail what was in flight, keep serving the rest
                log.exception("sampler: step failed")
                self._fail_in_flight(e)
                self._reset_device_state()
        self._fail_in_flight(RuntimeError("sampler: stopped"), pending=True)

    def _fail_in_flight(self, exc: BaseException, extra: Sequence[_Request] = (), pending: bool = False) -> None:
        """Fail every request holding rows or a prefill (plus `extra`, plus the queue when `pending`)."""
        reqs = {r.req for r in self._rows if r is not None} | set(self._deferred) | set(extra)
        if pending:
            reqs |= set(self._pending)
            self._pending.clear()
        self._rows = [None] * self.max_batch
        self._deferred.clear()
        for req in reqs:
            req.kv = None
            if not req.future.done():
                req.future.set_exception(exc)

    # admission ----------------------------------------------------------------------------------------

    def _bucket(self, n: int) -> int:
        return 0 if n == 0 else next(b for b in self.prefill_lengths if b >= n)

    def _admit(self) -> None:
        free = [r for r in range(self.max_batch) if self._rows[r] is None]
        while free and self._deferred:  # already prefilled samples go first
            req = self._deferred[0]
            self._place([req], free)
            if req.placed < req.spec.num_samples:
                return
            self._deferred.popleft()
        budget = self.prefill_token_budget  # prefill tokens per loop iteration, so decode keeps its pace
        while free and self._pending and budget > 0 and not self._deferred:
            batch = self._pick_batch(len(free))
            if not batch:
                return
            try:
                budget -= self._prefill(batch)
            except Exception as e:  # fails only this batch; the cache was not touched
                log.exception("sampler: prefill failed")
                for req in batch:
                    req.future.set_exception(e)
                continue
            self._place(batch, free)
            self._deferred.extend(req for req in batch if req.placed < req.spec.num_samples)

    def _pick_batch(self, n_free: int) -> list[_Request]:
        while self._pending and not self._pending[0].future.set_running_or_notify_cancel():
            self._pending.popleft()  # cancelled before it started
        if not self._pending:
            return []
        first = self._pending[0]
        T = self._bucket(len(first.spec.prompt) - 1)
        fit = [b for b in self.prefill_batches if b * max(T, 1) <= self.prefill_token_budget]
        limit = min(max(fit) if fit else 1, n_free)
        batch, keep = [], collections.deque()
        for req in self._pending:
            if (len(batch) < limit and req.snapshot is first.snapshot
                    and self._bucket(len(req.spec.prompt) - 1) == T
                    and (req is first or req.future.set_running_or_notify_cancel())):
                batch.append(req)
            elif not req.future.cancelled():
                keep.append(req)
        self._pending = keep
        return batch

    def _prefill(self, batch: list[_Request]) -> int:
        """Prefill one batch (same snapshot, same length bucket); returns the padded token count."""
        T = self._bucket(len(batch[0].spec.prompt) - 1)
        want = any(r.spec.wants_prompt_logprobs for r in batch)
        Bp = next((b for b in self.prefill_batches if b >= len(batch)), len(batch))
        if T == 0:  # one-token prompts: nothing to prefill
            lp = ids = tlp = None
        else:
            tokens = np.zeros((Bp, T), np.int32)
            targets = np.zeros((Bp, T), np.int32)
            for i, req in enumerate(batch):
                p = req.spec.prompt
                tokens[i, : len(p) - 1] = p[:-1]
                targets[i, : len(p) - 1] = p[1:]
            snap = batch[0].snapshot
            k, v, lp, ids, tlp = kernels.prefill(snap.graphdef, snap.frozen, snap.trainable, tokens, targets,
                                                 np.bool_(want), topk=self.max_topk, cache_dtype=self.cache_dtype)
            lp, ids, tlp = jax.device_get((lp, ids, tlp)) if want else (None, None, None)
            for i, req in enumerate(batch):
                req.kv = (k, v, i)
            self.stats["prefill_calls"] += 1
        for i, req in enumerate(batch):
            P = len(req.spec.prompt)
            if req.spec.wants_prompt_logprobs:
                req.prompt_lp = response.prompt_logprobs_array(None if lp is None else lp[i], P)
            if req.spec.topk_prompt_logprobs:
                req.topk = response.topk_prompt_logprobs(None if ids is None else ids[i],
                                                         None if tlp is None else tlp[i], P,
                                                         req.spec.topk_prompt_logprobs)
        return Bp * T

    def _place(self, reqs: list[_Request], free: list[int]) -> None:
        """Give free rows to the requests' unplaced samples, copying each one's prefill row into them."""
        B = self.max_batch
        dest, src = np.full(B, B, np.int32), np.zeros(B, np.int32)
        m, kv = 0, None
        running = any(r is not None for r in self._rows)
        for req in reqs:
            while free and req.placed < req.spec.num_samples:
                r = free.pop(0)
                if req.kv is not None:
                    kv = req.kv
                    dest[m], src[m] = r, req.kv[2]
                    m += 1
                self._start_row(r, req, req.placed)
                req.placed += 1
                self.stats["rows_started"] += 1
                self.stats["rows_joined_running_batch"] += running
        if m:  # every request of one call shares a prefill result (one batch, or one deferred request)
            self._cache = kernels.insert_rows(self._cache, kv[0], kv[1], dest, src)
        for req in reqs:
            if req.placed == req.spec.num_samples:
                req.kv = None

    def _start_row(self, r: int, req: _Request, sample: int) -> None:
        s = req.spec
        self._rows[r] = _Row(req, sample)
        d, p = self._dyn, self._par
        d["tok"][r], d["pos"][r], d["n_gen"][r], d["live"][r] = s.prompt[-1], len(s.prompt) - 1, 0, True
        p["max_tokens"][r], p["temperature"][r], p["top_k"][r], p["top_p"][r] = (
            s.max_tokens, s.temperature, s.top_k, s.top_p)
        p["seed"][r] = (s.seed >> 32, s.seed & 0xFFFFFFFF)
        p["sample"][r] = sample
        p["stop_ids"][r] = -1
        p["stop_ids"][r, : len(s.stop_token_ids)] = s.stop_token_ids

    # decode -------------------------------------------------------------------------------------------

    def _decode_round(self) -> None:
        rows = self._rows
        live = [r for r in range(self.max_batch) if rows[r] is not None and self._dyn["live"][r]]
        if not live:
            return
        snaps = {_snapshot_key(rows[r].req.snapshot): rows[r].req.snapshot for r in live}
        uid = min((u for u in snaps if u > self._last_snapshot_uid), default=min(snaps))  # round-robin
        self._last_snapshot_uid = uid
        snap = snaps[uid]
        run = np.array([rows[r] is not None and rows[r].req.snapshot is snap for r in range(self.max_batch)])
        # Slots this call can touch: below max(pos) + decode_steps (and below max_seq_len).
        need = int(self._dyn["pos"][run & self._dyn["live"]].max()) + self.decode_steps
        view = next(b for b in self.decode_lengths if b >= min(need, self.max_seq_len))
        # Row bucket: powers of 4 (1, 4, 16, ...) up to max_batch, covering the highest running row; free rows
        # are handed out lowest first, so light load decodes a few rows, not max_batch.
        top = int(np.flatnonzero(run).max()) + 1
        n_rows = next((b for b in (4 ** i for i in range(16)) if b >= top and b < self.max_batch), self.max_batch)
        cache, dyn, toks, lps, valid = kernels.decode(
            snap.graphdef, snap.frozen, snap.trainable, self._cache, self._dyn, self._par, run,
            n_steps=self.decode_steps, view=None if view >= self.max_seq_len else view, unroll=self.decode_unroll,
            rows=None if n_rows >= self.max_batch else n_rows)
        self._cache = cache
        dyn, toks, lps, valid = jax.device_get((dyn, toks, lps, valid))
        self._dyn = {k: np.array(v) for k, v in dyn.items()}
        self.stats["decode_calls"] += 1
        self.stats["last_decode_rows"] = min(n_rows, self.max_batch)
        self.stats["max_live_rows"] = max(self.stats["max_live_rows"], int(run.sum()))
        for r in np.flatnonzero(run):
            row = rows[r]
            reason = None
            for i in range(toks.shape[0]):
                if not valid[i, r]:
                    break
                row.tokens.append(int(toks[i, r]))
                row.logprobs.append(float(lps[i, r]))
                self.stats["tokens_generated"] += 1
                if row.req.stopper is not None and row.req.stopper.hit(row.tokens):
                    reason = "stop"
                    break
            if reason is None and not self._dyn["live"][r]:
                reason = "stop" if row.tokens[-1] in row.req.spec.stop_token_ids else "length"
            if reason is not None:
                self._finish(r, reason)

    def _finish(self, r: int, reason: str) -> None:
        row = self._rows[r]
        self._rows[r] = None
        self._dyn["live"][r] = False
        req = row.req
        req.results[row.sample] = response.sequence(row.tokens, row.logprobs, reason, req.sequence_ids[row.sample])
        req.done += 1
        if req.done == req.spec.num_samples and not req.future.done():
            req.future.set_result(response.sample_response(req.results, req.prompt_lp, req.topk))
