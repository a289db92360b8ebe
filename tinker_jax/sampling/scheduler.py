"""Sampler: a background thread that serves sampling requests with continuous batching.

Rows. The decode batch has a fixed number of rows B (the batch bucket); each row holds one sample of one request.
A new request is prefilled once (prompt[:-1], padded to a length bucket, batched with other new requests of the
same snapshot and bucket) and its samples take free rows (`num_samples` shares one prefill; samples that find no
free row wait, holding the prefill result, and take rows as they free up); the rows join the running decode loop
at once. A row's first decode step feeds the last prompt token, so the prefill never needs logits unless prompt
logprobs were asked for. Finished rows leave at the end of the decode call that finished them. A prompt longer
than `prefill_chunk` is prefilled a chunk per step between decode calls (`_Prefilling`; the chunks of the long
prompts in progress in shared calls, a prefill row each), its KV written into pool pages taken for its prompt (so
a long prompt's prefill stays inside `kv_cache_tokens`), then placed like any other (its prefill result gathered
from those pages, which it then lets go).

Prefix cache. A prompt leaves its KV pages to later requests of the same weights, keyed by the whole prompt and,
when longer than `prefill_chunk`, by each of its prefixes of whole chunks. A request whose whole prompt is cached is
not prefilled at all: its samples list the cached full pages and copy the partly filled last one (a GRPO group sent
as separate requests costs one prefill however its requests arrive); one that finds a prefix of whole chunks lists
those pages in its chunked prefill's page table, reads them in place and starts at the next chunk
(`prompt_cache_hit_tokens`). A page cached by a request that scored its prompt keeps its tokens' logprobs, so a
later request asking for its prompt's logprobs (compute_logprobs of a GRPO group's sequences) takes them from there
and computes only the rest. Cached pages
count as used until a row needs them: `_place` evicts the least recently used before it makes a sample wait.

KV pages. The rows' KV cache is a pool of pages (models.decoder.PagedKV) sized by `kv_cache_tokens`, not by
B x max_seq_len; each row has a table of its pages in position order. A sample's row takes, when it starts, the
pages its prompt + max_tokens need (so it never runs out mid-decode): the request's full prompt pages, copied from
the prefill into the pool once per batch shard and listed by every sample's row there (`PagePool` counts their
holders), and pages of its own, the first of which gets a copy of the prompt's partly filled last page (decode
writes into it). Pages free when their last holder finishes. A sample that finds no row with enough free pages
waits like one that finds no row; a request that could never fit is refused when submitted (naming max_tokens).

Snapshots. A request names an immutable WeightSnapshot: base weights (`params`) and, for a LoRA run, an adapter.
Every row whose snapshot shares one `params` object (the base model, and every LoRA snapshot over it) decodes in
the same call, each row with its own adapter: adapters are copied once into per-rank tables (`_Table`, in the
compute dtype; at most `max_adapters` per rank resident, least recently used evicted when no row uses it) and each
row carries its table slot. Snapshots with their own params (full fine-tuning) decode in calls of their own;
calls alternate between such groups round-robin. A prefill batch holds requests of one group, one prompt-length
bucket and one adapter rank (any adapters of that rank).

Fairness. Requests are admitted round-robin across tenants (`submit(..., tenant=)`), so a tenant with a thousand
queued samples does not hold back another's one.

Placement. The sampler runs over a mesh (`mesh`, default: one device) by the training rule table: the KV pool's
pages over the batch mesh axes (data, expert, fsdp; each shard's pages with its rows) and its kv heads over tensor
where they divide, adapter tables like
training's adapter pools, per-row inputs over rows; the snapshots' weights must already be placed by the same rules
(the engine loads them so). max_batch is rounded up to a multiple of the batch shards (logged), free rows are handed
out round-robin over the shards (so a light load decodes few rows on every device, see kernels.py), and only small
replicated results (tokens, logprobs, row state) come back to the host.

Threading. `submit` only validates and enqueues; `step` (one admission round and one decode call) does the rest on
one thread: the sampler's own (`start`) or its owner's (an engine worker calls `step` between training rounds).
A bad request fails only its own future. A device error fails the requests it touched.

Several processes. A step's decisions depend only on the requests it was given and on replicated device results,
so processes that run the same steps with the same requests stay identical: an engine's leader starts each step's
new requests (`take_incoming(start=True)`: no cancel can change them afterwards) and publishes them with their
validated specs (seeds included); followers rebuild them (`request`) and run `step(them)`. Weights are numbered
in order of first sight (`_Serials`), not by object id, so weight groups' turns and the prefix cache's keys agree
across processes.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tinker import types

from tinker_jax import distributed
from tinker_jax.errors import Stopped, UserError
from tinker_jax.futures import begin
from tinker_jax.models import lora as lora_math
from tinker_jax.models.config import ModelConfig
from tinker_jax.models import paged_attention
from tinker_jax.models.decoder import ATTENTION_IMPLS, DECODE_ATTENTION, PAGED_INTERPRET, KVCache, probe_attention
from tinker_jax.models.sharding import DEFAULT_RULES, MeshConfig, batch_shards, from_host, make_mesh, zeros
from tinker_jax.sampling import kernels, response
from tinker_jax.sampling.base import SamplerBase
from tinker_jax.sampling.pages import PagePool, pages_per_shard
from tinker_jax.sampling.params import Limits, RequestSpec
from tinker_jax.sampling.snapshot import WeightSnapshot
from tinker_jax.sampling.stops import StopStrings, Tokenizer

log = logging.getLogger(__name__)

_MAX_IDLE_TABLES = 4  # adapter tables (one per rank) kept when nothing holds them
_MAX_PREFIXES = 16384  # prefix cache entries (each a 16-byte digest and its pages: a whole prompt's, or one page)
PREFILL_BATCHES = (1, 2, 4, 8)  # row buckets of a prefill call (Sampler's default prefill_batches)
PREFILL_TOKEN_BUDGET = 16384  # rows x length bucket of one prefill call at most (default prefill_token_budget)


@dataclass(eq=False)
class _Request:
    uid: int
    snapshot: WeightSnapshot
    spec: RequestSpec
    future: Future
    sequence_ids: list[str]
    stopper: StopStrings | None
    tenant: str = "local"
    rank: int = 0  # its adapter's rank (0: none)
    table_slot: int = 0  # its adapter's slot in the rank's table while admitted (0: the null adapter)
    results: list[Any] = field(default_factory=list)
    placed: int = 0  # samples given a row so far
    done: int = 0
    kv: tuple | None = None  # (k, v, row) of its prefill, held until every sample has a row
    shared: dict = field(default_factory=dict)  # shard -> its prompt's full KV pages there, held until all are placed
    twin: "_Request | None" = None  # the request of its prefill batch with the same prompt and adapter whose prefill
    #                                 row it shares, and whose prompt pages it lists where both have rows
    prompt_lp: np.ndarray | None = None
    topk: Any = None
    target: Any = None  # target_prompt_logprobs' answer (tinker TensorData) once prefilled
    alt: Any = None  # prompt_alt_tokens_k's draws (tinker PromptAltTokens) once prefilled
    group: int = 0  # its weights group (`Sampler._group`), numbered alike on every process
    cache_hit: int = 0  # prompt tokens whose KV came from the prefix cache (SampleResponse.prompt_cache_hit_tokens)
    page_keys: list | None = None  # digests of its prompt's full pages, each of every token before it (`_page_keys`)
    seq: int = 0  # its place in its engine worker's request log (several processes: how followers match it)
    waited: bool = False  # it waited once for a batch mate's prefix (`_after_batch_mates`): it does not again
    cached_lp: np.ndarray | None = None  # scoring from cached pages: their tokens' logprobs, taken with the pages


@dataclass(eq=False)
class _Prefilling:
    """A long prompt's prefill in progress, a chunk per step (kernels.prefill_pages, in one call with other long
    prompts' chunks: `_run_chunks`): its inputs on the host, padded to S slots (tokens and targets [S]; `score`:
    target ids [S, A], its temperature and seed words); the pool pages its chunks write on batch shard `shard`
    (`pages`, its own, after the pages found in the prefix cache, which the request holds in `req.shared`) and its
    page table [W] listing both (W * page >= S slots; 0, the scratch page, past its prompt's pages); per-chunk
    prompt scores on the host."""

    req: _Request
    T: int  # its length bucket (the prefill result it hands on has T slots)
    tokens: np.ndarray
    targets: np.ndarray
    score: dict  # kernels._prompt_scores' per-row inputs, this row's
    draws: int
    n: int  # chunks to run (after `base`)
    shard: int
    pages: list[int]  # its own pages on `shard`, held until the prefill is done (then gathered, and let go)
    table: np.ndarray
    done: int = 0  # chunks run (0: started this step, its first chunk not run yet)
    base: int = 0  # where its chunks start: after the positions found in the prefix cache (a multiple of the
    #                page size), or at the last of them when it scores its prompt (`_rest`)
    cached: int = 0  # positions found in the prefix cache: its chunks write none of them (their pages are shared)
    parts: list = field(default_factory=list)  # per chunk: kernels._prompt_scores' outputs [1, chunk, ...] when the
    #                                            prompt is scored


@dataclass(eq=False)
class _Row:
    req: _Request
    sample: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[tuple] = field(default_factory=list)  # per token, (ids [k], logprobs [k]) when the request asked


# How long an idle sampler waits for a burst of requests at most, in gaps of `burst_gap_ms` (take_incoming): 10
# gaps of the default 2 ms cap what a request sent right after another can add to its latency at 20 ms.
BURST_GAPS = 10


def _leading(shards: list[int], shard: int) -> int:
    """How many of `shards` (cached pages' shards, in position order) come first on `shard`: the cached prefix a
    row of that shard can list (a row's table lists one shard's pages)."""
    return next((j for j, s in enumerate(shards) if s != shard), len(shards))


def _pow2(n: int) -> int:
    """0 for 0, else the smallest power of two >= n."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


class _Serials:
    """Numbers for objects, 1, 2, ... in order of first sight, never reused: unlike id(), which a new object takes
    over once the old one is gone. The sampler's steps see weights in one order on every process of an engine, so
    numbers given on its step thread agree there, whenever each process's garbage collector frees the old ones."""

    def __init__(self):
        self._by_id: dict[int, tuple[weakref.ref, int]] = {}  # id -> (the object, weakly; its number)
        self._next = itertools.count(1)

    def __call__(self, obj) -> int:
        i = id(obj)
        got = self._by_id.get(i)
        if got is not None and got[0]() is obj:
            return got[1]
        by_id = self._by_id

        def gone(ref, i=i):  # runs while the object is freed, before its id can be taken again
            if by_id.get(i, (None,))[0] is ref:
                by_id.pop(i, None)

        n = next(self._next)
        by_id[i] = (weakref.ref(obj, gone), n)
        return n


def params_key(snapshot: WeightSnapshot) -> int:
    """Snapshots whose params are the same arrays decode together (identity of the first weight array)."""
    return id(jax.tree.leaves(snapshot.params)[0])


class _Table:
    """Adapters of one rank resident in the sampler: {proj: {"a": [L,S,in,R], "b": ...}} in the compute dtype and
    scales [S,P]. Slot 0 is the null adapter. A slot is held (`users`) by every admitted request of its adapter;
    an unheld slot keeps its adapter for reuse until another adapter needs the room (least recently used first)."""

    def __init__(self, cfg: ModelConfig, rank: int, capacity: int, dtype, placement: kernels.Placement):
        self.cfg, self.rank, self.placement = cfg, rank, placement
        shapes = lora_math.shapes(cfg, rank, capacity + 1)
        sh = placement.table(rank, capacity + 1)  # like training's adapter pools: `a` by its input axis, `b` output
        self.weights = {n: {k: zeros(s, dtype, sh[n][k]) for k, s in w.items()} for n, w in shapes.items()}
        self.scale = zeros((capacity + 1, len(lora_math.NAMES)), jnp.float32, placement.rep)
        self.users = [0] * (capacity + 1)
        self.holder: list[Any] = [None] * (capacity + 1)  # the resident Adapter per slot (kept alive while resident)
        self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # slot order, oldest use first

    def acquire(self, adapter) -> int | None:
        for slot in range(1, len(self.holder)):
            if self.holder[slot] is adapter:
                break
        else:
            free = [s for s in range(1, len(self.holder)) if self.users[s] == 0]
            if not free:
                return None
            # Dense decode multiplies every resident adapter by each row's one-hot selector: a NaN or inf there would
            # reach every row of the call (NaN x 0 = NaN), other tenants' and bare base-model rows included.
            if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(adapter.weights)):
                raise UserError("model weights: this adapter holds NaN or inf values (did training diverge?); it "
                                "cannot be sampled")
            empty = [s for s in free if self.holder[s] is None]
            slot = empty[0] if empty else next(s for s in self.lru if s in free)
            pl = self.placement
            # The adapter may live anywhere (a checkpoint restored over the mesh, or one device): placed like the
            # table first, so the kernel's in_shardings hold and the copy into the slot stays on each device.
            # Projections it does not adapt are zeros made in place (lora_math.complete would make them on one
            # device, and placing those host-made values asks every process whether they agree).
            sh, shapes = pl.adapter(self.rank), lora_math.shapes(self.cfg, self.rank)
            full = {n: {k: (jax.device_put(adapter.weights[n][k], sh[n][k]) if n in adapter.weights
                            else zeros(shape, jnp.float32, sh[n][k])) for k, shape in w.items()}
                    for n, w in shapes.items()}
            self.weights, self.scale = kernels.put_adapter(
                pl, self.weights, self.scale, from_host(np.int32(slot), pl.rep), full,
                from_host(np.asarray(adapter.spec.scales(), np.float32), pl.rep))
            self.holder[slot] = adapter
        self.users[slot] += 1
        self.lru[slot] = None
        self.lru.move_to_end(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot:
            self.users[slot] -= 1

    def resident(self) -> int:
        return sum(h is not None for h in self.holder)


def row_buckets(batches: Sequence[int], shards: int, max_batch: int) -> tuple[int, ...]:
    """A sampler's prefill row buckets: prefill rows split over the batch shards too, so each bucket is rounded up
    to a multiple of them (a shard's share costs the same time whether its other rows are padding or not), at
    most max_batch (itself a multiple of them)."""
    return tuple(sorted(set(min(-(-int(b) // shards) * shards, max_batch) for b in batches)))


def default_lengths(max_seq_len: int, start: int = 16) -> tuple[int, ...]:
    """Length buckets: powers of two from `start` below max_seq_len, then max_seq_len (the default prefill lengths;
    from 64, the decode views)."""
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
      max_batch: rows B of the decode batch.
      max_seq_len: context per row (prompt + max_tokens).
      prefill_lengths: length buckets for prefill (prompt length - 1 is padded up to one of them).
      prefill_batches: row buckets for one prefill call.
      prefill_token_budget: at most this many (rows x bucket length) tokens per prefill call.
      burst_gap_ms: when the sampler is idle, the step that a new request wakes first waits while more keep
        arriving, each within this many milliseconds of the last (for at most BURST_GAPS gaps), and takes them
        all: a batch of requests sent one after another (a client's loop; tinker-cookbook sends a group's
        rollouts as separate requests) is then prefilled and decoded together, instead of its first few alone
        for a whole decode call while the rest wait. A lone request waits one gap. 0: off.
      prefill_chunk: prompts longer than this are prefilled this many tokens per step (kernels.prefill_pages; the
        chunks of the long prompts in progress in shared calls of up to the largest prefill row bucket), so running
        decodes keep their pace and attention memory is linear in the prompt's length; their KV goes into
        pool pages (one shard with free pages for the whole prompt is needed to start; requests after it wait
        meanwhile, `prefill_waits_for_pages` counts those steps); a long prompt that begins with at least a chunk
        of the pages another long prompt in progress is writing waits for them (`prefill_waits_for_long_mate`), so
        a GRPO group of a long prompt sent as separate requests is prefilled once; 0 or None: whole.
      decode_steps: most decode steps per device call (one host round trip): the call's device loop ends sooner
        when its rows have all finished, or right after a row finished while requests wait for one.
      decode_unroll: unroll the decoder's layer loop inside a decode step.
      decode_attention: how a decode step attends (models.decoder.DECODE_ATTENTION): "einsum" (batched dots over
        each row's gathered context), "reduce" (fused products and sums), "paged" (a Pallas kernel that reads each
        row's pages in place, models.paged_attention: GPUs, not measured yet; elsewhere interpreted, for
        tests), or "auto": "reduce" where the mesh's devices are CPUs (measured faster there,
        benchmarks/RESULTS.md), "einsum" elsewhere.
      decode_lengths: cache-length buckets a decode call attends over (the smallest one that holds every
        running row's positions for the call; one compiled decode program each). Default: powers of two from
        64, then max_seq_len.
      prefill_attention: how a whole-prompt prefill attends over its own keys (models.decoder.ATTENTION_IMPLS):
        "einsum" (the exact reference), "cudnn" (flash attention on a GPU, bf16: the [rows, heads, T, T] scores
        never reach memory) or "xla" (jax.nn.dot_product_attention); checked at start. Long prompts' chunks, which
        also attend over pages, take the einsum path.
      max_num_samples: cap on num_samples per request.
      max_topk_prompt_logprobs: cap on topk_prompt_logprobs (a static width of the prefill kernel).
      max_stop_tokens: cap on stop token ids per request (a static width of the decode kernel).
      tokenizer: anything with `decode(list[int]) -> str`; needed for stop strings.
      cache_dtype: KV cache dtype (and the dtype adapters are kept in for sampling).
      max_adapters: adapters resident per rank at once.
      kv_cache_tokens: the KV cache's size in tokens (positions of all rows together; default max_batch *
        max_seq_len). The cache is a pool of pages shared by the rows (models.decoder.PagedKV): a row takes the
        pages its prompt + max_tokens need when it starts (a request's samples share its full prompt pages) and
        frees them when it finishes; a sample that finds too few free pages waits for them, a request that could
        never fit is refused naming max_tokens. Split evenly over the batch shards.
      page_size: tokens per KV page.
      prefix_cache: keep prompts' KV pages after their requests: a later request with the same weights and the
        same prompt (another rollout of a GRPO group, sent alone) is not prefilled, and one that begins with some
        of the same whole pages (a multi-turn conversation's next turn, a shared system prompt or few-shot
        prefix) prefills only the rest; the pages give way to rows that need them (least recently used first).
        Requests of one prefill batch that begin with the same whole pages, not cached yet, wait for the first
        one's (one whole prefill, then one of the rests). A request that asks for its prompt's logprobs alone
        (compute_logprobs) uses pages cached with their tokens' logprobs (by a request that scored them) and
        prefills from the last cached position, whose query scores the first token after them; one that asks for
        top-k prompt logprobs, target ids or draws does not use it.
      on_submit: called (any thread) after a request is queued, e.g. to wake the thread that calls `step`.
      mesh: the jax.sharding.Mesh to run on (axes data, fsdp, tensor; models.sharding.make_mesh); None: one device.
        Snapshots' weights must be placed on it by `rules` (models.sharding.state_shardings), as the engine loads
        them; max_batch and the prefill row buckets are rounded up to multiples of the batch shards
        (data * expert * fsdp).
      rules: the logical-axis rule table (models.sharding.DEFAULT_RULES, the one training uses).
      compiler_options: XLA options the sampling kernels compile with (jax.jit's; e.g. tests turn CPU optimisation
        off: an 8-device decode program then compiles in about 1 s instead of 7).
    """

    _thread_name = "tinker-jax-sampler"
    # What a device failure is reported as (its owner may know better, e.g. a lost process of the engine).
    explain = staticmethod(lambda e: e)

    def __init__(self, cfg: ModelConfig, eos_token_ids: Sequence[int] | int | None = None, *, max_batch: int = 8,
                 max_seq_len: int = 4096, prefill_lengths: Sequence[int] | None = None,
                 prefill_batches: Sequence[int] = PREFILL_BATCHES, prefill_token_budget: int = PREFILL_TOKEN_BUDGET,
                 burst_gap_ms: float = 2.0,
                 prefill_chunk: int | None = 512, decode_steps: int = 8, decode_unroll: bool = False,
                 decode_attention: str = "auto", decode_lengths: Sequence[int] | None = None,
                 prefill_attention: str = "einsum", max_num_samples: int = 128, max_topk_prompt_logprobs: int = 20,
                 max_stop_tokens: int = 16,
                 tokenizer: Tokenizer | None = None, cache_dtype=jnp.float32, max_adapters: int = 16,
                 kv_cache_tokens: int | None = None, page_size: int = 16, prefix_cache: bool = True,
                 on_submit=None, mesh=None, rules=DEFAULT_RULES, compiler_options: dict | None = None):
        if eos_token_ids is None:
            eos_token_ids = cfg.eos_token_id
        if eos_token_ids is None:
            eos_token_ids = ()
        elif np.ndim(eos_token_ids) == 0:
            eos_token_ids = (eos_token_ids,)
        self.cfg = cfg
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.mesh = mesh if mesh is not None else make_mesh(MeshConfig())  # one device: the behaviour without a mesh
        self.rules = rules
        shards = batch_shards(self.mesh, rules)
        # Every batch shard holds the same number of cache rows: round up rather than refuse, since max_batch comes
        # from a config written without the mesh in mind (and more rows cost no more time per step on a mesh).
        self.max_batch = -(-int(max_batch) // shards) * shards
        if self.max_batch != int(max_batch):
            log.warning("sampler: max_batch %d rounded up to %d, a multiple of the %d batch shards of the mesh %s",
                        int(max_batch), self.max_batch, shards, dict(self.mesh.shape))
        self.placement = kernels.Placement(self.mesh, cfg, self.max_batch, rules, compiler_options)
        # Free rows in the order they are handed out: round-robin over the shards (row i of every shard before row
        # i + 1 of any), so a decode call on the first few rows of each shard covers every running row.
        per = self.max_batch // shards
        self._row_order = [s * per + i for i in range(per) for s in range(shards)]
        self.max_seq_len = int(max_seq_len)
        if isinstance(page_size, bool) or int(page_size) < 1:
            raise ValueError(f"page_size: must be a positive number of tokens, got {page_size!r}")
        self.page_size = int(page_size)
        default_tokens = self.max_batch * self.max_seq_len
        self.kv_cache_tokens = int(kv_cache_tokens) if kv_cache_tokens is not None else default_tokens
        if self.kv_cache_tokens < 1:
            raise ValueError(f"kv_cache_tokens: must be a positive number of tokens, got {kv_cache_tokens!r}")
        self._table_width = -(-self.max_seq_len // self.page_size)  # W: pages a row can list
        self._pages = PagePool(shards, pages_per_shard(self.kv_cache_tokens, self.page_size, shards))
        lengths = sorted(set(int(n) for n in (prefill_lengths or default_lengths(self.max_seq_len))))
        if lengths[-1] < self.max_seq_len - 1:  # prefill covers prompt[:-1], at most max_seq_len - 2 tokens
            lengths.append(self.max_seq_len)
        if lengths[-1] > self.max_seq_len + 1 or lengths[0] <= 0:
            raise ValueError(f"prefill_lengths: buckets must lie in [1, max_seq_len + 1], got {lengths}")
        self.prefill_lengths = tuple(lengths)
        self.prefill_batches = row_buckets(prefill_batches, shards, self.max_batch)
        self.prefill_token_budget = int(prefill_token_budget)
        if not (isinstance(burst_gap_ms, (int, float)) and not isinstance(burst_gap_ms, bool)
                and 0 <= burst_gap_ms <= 50):
            raise ValueError(f"burst_gap_ms: expected a number of milliseconds in [0, 50], got {burst_gap_ms!r}")
        self.burst_gap_s = float(burst_gap_ms) / 1e3
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or int(prefill_chunk) < 0):
            raise ValueError(f"prefill_chunk: must be a number of tokens (0 or None: whole prompts), got "
                             f"{prefill_chunk!r}")
        self.prefill_chunk = int(prefill_chunk) if prefill_chunk else None
        # Whole prompts, and prompts' full pages. On every process of an engine alike: entries are keyed by weights
        # numbers given in step order (`_Serials`), and found, kept and evicted only by the steps' own decisions.
        self.prefix_cache = bool(prefix_cache)
        self.decode_steps = int(decode_steps)
        self.decode_unroll = bool(decode_unroll)
        if decode_attention not in ("auto", *DECODE_ATTENTION):
            raise ValueError(f"sampler.decode_attention: expected auto or one of {DECODE_ATTENTION}, "
                             f"got {decode_attention!r}")
        platform = self.mesh.devices.flat[0].platform
        auto = "reduce" if platform == "cpu" else "einsum"
        self.decode_attention = auto if decode_attention == "auto" else decode_attention
        if self.decode_attention == "paged":
            why = paged_attention.unsupported(self.placement.pool.spec, self.page_size, cfg.head_dim)
            if why:
                raise ValueError(f"sampler.decode_attention: paged cannot serve this sampler: {why} (page_size, "
                                 "the model's head_dim, the mesh rules; or use einsum or reduce)")
            if platform != "gpu":  # Pallas lowers it for GPUs; elsewhere, interpreted
                log.warning("sampler: decode_attention paged on %s runs in Pallas' interpreter (slow; for tests)",
                            platform)
                self.decode_attention = PAGED_INTERPRET
        # From 64: a short sample attends over little more than its own positions (a 32 +32 batch-1 decode went
        # from x1.13 to x2.23 of transformers' generate on the CPU suite against a 256-slot first view). A view is
        # compiled only when a call first needs it, so long-prompt workloads never build the short ones.
        if prefill_attention not in ATTENTION_IMPLS:
            raise ValueError(f"sampler.prefill_attention: expected one of {ATTENTION_IMPLS}, got {prefill_attention!r}")
        if prefill_attention == "cudnn" and jnp.dtype(cache_dtype) != jnp.bfloat16:  # (the snapshots' compute dtype)
            raise ValueError(f"sampler.prefill_attention: cudnn needs bfloat16 compute (sampler.dtype), not "
                             f"{jnp.dtype(cache_dtype).name}")
        if prefill_attention != "einsum":  # a kernel this platform lacks fails here, naming the field, not mid-request
            why = probe_attention(prefill_attention, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, backward=False)
            if why:
                raise ValueError(f"sampler.prefill_attention: {prefill_attention} does not run here: {why}")
        self.prefill_attention = prefill_attention
        views = decode_lengths or default_lengths(self.max_seq_len, start=64)
        self.decode_lengths = tuple(sorted(set(min(int(n), self.max_seq_len) for n in views) | {self.max_seq_len}))
        self.max_topk = int(max_topk_prompt_logprobs)
        self.max_stop_tokens = int(max_stop_tokens)
        self.tokenizer = tokenizer
        self.cache_dtype = cache_dtype
        self.max_adapters = int(max_adapters)
        self._on_submit = on_submit
        self._tables: dict[int, _Table] = {}  # rank -> resident adapters
        self._tenant_turn: collections.OrderedDict[str, None] = collections.OrderedDict()
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
        self._placed_ok: set[int] = set()  # params_key of snapshots whose placement was checked
        self._serial = _Serials()  # weights -> their number (weights groups, prefix cache keys); step thread only
        # Loop-thread state.
        self._pending: collections.deque[_Request] = collections.deque()
        self._deferred: collections.deque[_Request] = collections.deque()
        self._prefilling: collections.deque[_Prefilling] = collections.deque()  # long prompts, a chunk per step
        self._rows: list[_Row | None] = [None] * self.max_batch
        self._last_group = -1
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
            self._fail_in_flight(Stopped("sampler: stopped"), extra=leftover, pending=True)

    def submit(self, snapshot: WeightSnapshot, prompt_tokens: Sequence[int], params: types.SamplingParams,
               num_samples: int = 1, include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, *,
               sequence_ids: Sequence[str] | None = None, tenant: str = "local",
               topk_sample_logprobs: int = 0, target_prompt_logprobs: Any = None,
               prompt_alt_tokens_k: int = 0) -> Future:
        """Enqueue one request; the Future resolves to a tinker.types.SampleResponse.

        Invalid requests get a future that already holds a UserError naming the field (never raised here).
        `sequence_ids` (default "<request>:<i>") become SampledSequence.sequence_id, in sample order.
        `topk_sample_logprobs` k: each sampled position's k most likely tokens with their logprobs, from the
        distribution its logprob is reported from (logits / T, untruncated; SampledSequence.topk_logprobs).
        `target_prompt_logprobs` (int ids [len(prompt) - 1, K], dense or CSR TensorData; -1: none): their logprobs
        at each prompt position, in the same layout (SampleResponse.target_prompt_logprobs).
        `prompt_alt_tokens_k` k: k tokens drawn at every prompt position after the first, at the request's
        temperature, with their logprobs under that distribution (SampleResponse.prompt_alt_tokens).
        Without an owner calling `step` (see `drive`), the sampler's own thread starts on the first submit.
        """
        try:
            req = self.prepare(snapshot, prompt_tokens, params, num_samples, include_prompt_logprobs,
                               topk_prompt_logprobs, sequence_ids=sequence_ids, tenant=tenant,
                               topk_sample_logprobs=topk_sample_logprobs,
                               target_prompt_logprobs=target_prompt_logprobs,
                               prompt_alt_tokens_k=prompt_alt_tokens_k)
        except (UserError, ValueError) as e:
            fut: Future = Future()
            fut.set_exception(e)
            return fut
        self.enqueue(req)
        return req.future

    def prepare(self, snapshot: WeightSnapshot, prompt_tokens: Sequence[int], params: types.SamplingParams,
                num_samples: int = 1, include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, *,
                sequence_ids: Sequence[str] | None = None, tenant: str = "local",
                topk_sample_logprobs: int = 0, target_prompt_logprobs: Any = None,
                prompt_alt_tokens_k: int = 0) -> _Request:
        """`submit`'s validation (UserError or ValueError naming the field): a request, not yet queued."""
        if not isinstance(snapshot, WeightSnapshot):
            raise UserError(f"snapshot: expected a WeightSnapshot, got {type(snapshot).__name__}")
        if snapshot.cfg != self.cfg:
            raise UserError(f"snapshot: model config {snapshot.cfg.family}/d_model={snapshot.cfg.d_model} does "
                            f"not match this sampler's {self.cfg.family}/d_model={self.cfg.d_model}")
        self._check_placement(snapshot)
        uid = next(self._uids)
        spec, ids = self._request(uid, prompt_tokens, params, num_samples, include_prompt_logprobs,
                                  topk_prompt_logprobs, sequence_ids, topk_sample_logprobs, target_prompt_logprobs,
                                  prompt_alt_tokens_k)
        need = self._page_needs(spec)[0]
        if need > self._pages.capacity:
            raise UserError(f"max_tokens: the prompt ({len(spec.prompt)} tokens) and max_tokens ({spec.max_tokens}) "
                            f"need {need} KV-cache pages of {self.page_size} tokens; this sampler has "
                            f"{self._pages.capacity} per batch shard (its kv_cache_tokens is {self.kv_cache_tokens})")
        return self.request(uid, snapshot, spec, ids, tenant, Future())

    def _page_needs(self, spec: RequestSpec) -> tuple[int, int]:
        """(pages one sample's row lists, how many of them are full prompt pages its request's samples share).
        Positions 0 .. len(prompt) + max_tokens - 2 are written (the last token sampled is never fed back); the
        prefill writes the prompt's first len(prompt) - 1, and decode never writes into a page below position
        len(prompt) - 1."""
        P = len(spec.prompt)
        return -(-(P - 1 + spec.max_tokens) // self.page_size), (P - 1) // self.page_size

    def request(self, uid: int, snapshot: WeightSnapshot, spec: RequestSpec, sequence_ids: list[str], tenant: str,
                future: Future, seq: int = 0) -> _Request:
        """A request of a validated spec (`prepare`; or a leader's, replayed on another process)."""
        stopper = StopStrings(self.tokenizer, spec.stop_strings) if spec.stop_strings else None
        rank = snapshot.adapter.spec.rank if snapshot.adapter is not None else 0
        return _Request(uid, snapshot, spec, future, list(sequence_ids), stopper, tenant, rank,
                        results=[None] * spec.num_samples, seq=seq)

    def enqueue(self, req: _Request) -> None:
        """Queue a prepared request for the next `step`."""
        with self._cv:
            if self._stopping:
                req.future.set_exception(Stopped("sampler: stopped"))
                return
            self._incoming.append(req)
            self._cv.notify_all()
        if self._on_submit is not None:
            self._on_submit()
        elif self._thread is None:
            self.start()

    def _check_placement(self, snapshot: WeightSnapshot) -> None:
        """ValueError unless the snapshot's weights sit on this sampler's mesh as its rules say (the kernels take them
        with those in_shardings; moving a model per call is never wanted). Checked once per params object."""
        key = params_key(snapshot)
        if key in self._placed_ok:
            return
        bad = self.placement.misplaced(snapshot.graphdef, snapshot.params)
        if bad is not None:
            raise ValueError(f"snapshot: its weights are not placed on this sampler's mesh {dict(self.mesh.shape)} "
                             f"by its rules ({bad}); load them with models.sharding.state_shardings(state, mesh)")
        with self._cv:
            if len(self._placed_ok) > 64:  # ids of freed params can come back: keep only recent ones
                self._placed_ok.clear()
            self._placed_ok.add(key)

    def drive(self, on_submit) -> "Sampler":
        """Let the caller's thread run the loop: it calls `step()` whenever `has_work()`; `on_submit` is called
        after each submit (to wake it). No thread of the sampler's own is started."""
        self._on_submit = on_submit
        return self

    def has_work(self) -> bool:
        with self._cv:
            if self._incoming:
                return True
        return not self._idle()

    def take_incoming(self, start: bool = False) -> list[_Request]:
        """The requests queued since the last step, to hand to `step`. start: start them now (cancelled ones are
        dropped): a step's requests are then fixed, which lets a leader publish them for other processes to run
        alike; otherwise a request stays cancellable until its prefill. On an idle sampler, waits for the rest of
        a burst first (`burst_gap_ms`; only here, before the step's requests are fixed, so a leader publishes the
        whole burst and other processes replay it without waiting)."""
        with self._cv:
            if self.burst_gap_s > 0 and self._incoming and self._idle():
                self._await_burst()
            new, self._incoming = self._incoming, []
        return [r for r in new if begin(r.future)] if start else new

    def _idle(self) -> bool:
        """Nothing queued, prefilling or decoding (read on the stepping thread, which alone changes these)."""
        return not (self._pending or self._deferred or self._prefilling or any(r is not None for r in self._rows))

    def _await_burst(self) -> None:
        """With self._cv held: wait (releasing it) until no request has arrived for one gap, or BURST_GAPS gaps
        have passed, or the sampler stops. `enqueue` notifies on every arrival."""
        deadline = time.monotonic() + BURST_GAPS * self.burst_gap_s
        n = len(self._incoming)
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(min(self.burst_gap_s, left))
            if len(self._incoming) == n:
                return
            n = len(self._incoming)

    def step(self, incoming: list[_Request] | None = None) -> None:
        """One admission round and one decode call (on the thread that owns the loop), after queueing `incoming`
        (default: `take_incoming()`)."""
        if incoming is None:
            incoming = self.take_incoming()
        for req in incoming:
            req.group = self._group(req.snapshot)
        self._pending.extend(incoming)
        try:
            self._admit()
            self._decode_round()
        except Exception as e:  # a device failure: fail what was in flight, keep serving the rest
            log.exception("sampler: step failed")
            self._fail_in_flight(self.explain(e))
            self._reset_device_state()

    def _group(self, snapshot: WeightSnapshot) -> int:
        """The number of the snapshot's weights group: snapshots sharing one params object decode together. Numbered
        in order of first sight in step order (`_Serials`), so alike on every process of an engine; object ids would
        order the groups' turns differently there, and an id that came back for new params would name an old
        group on one process and not on another."""
        return self._serial(jax.tree.leaves(snapshot.params)[0])

    def stats_now(self) -> dict:
        return {**self.stats, "queued": len(self._pending) + len(self._incoming) + len(self._prefilling),
                "running_rows": sum(r is not None for r in self._rows), "kv_pages_used": self._pages.used(),
                "kv_pages_total": self._pages.shards * self._pages.capacity, "prefix_cache_entries": len(self._prefix),
                "resident_adapters": sum(t.resident() for t in list(self._tables.values()))}

    # --------------------------------------------------------------------------------------- loop thread

    def _reset_device_state(self) -> None:
        B, NS, pg = self.max_batch, self.max_stop_tokens, self._pages
        shape = (self.cfg.n_layers, pg.shards, pg.per_shard, self.page_size, self.cfg.n_kv_heads, self.cfg.head_dim)
        c = self.placement.pool  # pages over the batch shards, kv heads over tensor where they divide
        self._pool = (zeros(shape, self.cache_dtype, c), zeros(shape, self.cache_dtype, c))
        self._free_pages()
        self._dyn = dict(tok=np.zeros(B, np.int32), pos=np.zeros(B, np.int32), n_gen=np.zeros(B, np.int32),
                         live=np.zeros(B, bool))
        self._par = dict(max_tokens=np.ones(B, np.int32), temperature=np.zeros(B, np.float32),
                         top_k=np.zeros(B, np.int32), top_p=np.ones(B, np.float32), seed=np.zeros((B, 2), np.uint32),
                         sample=np.zeros(B, np.int32), stop_ids=np.full((B, NS), -1, np.int32),
                         topk_n=np.zeros(B, np.int32))
        self._par_dev = None

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._incoming or not self._idle()):
                    self._cv.wait()
                if self._stopping:
                    break
            self.step()
        self._fail_in_flight(Stopped("sampler: stopped"), pending=True)

    def _fail_in_flight(self, exc: BaseException, extra: Sequence[_Request] = (), pending: bool = False) -> None:
        """Fail every request holding rows or a prefill (plus `extra`, plus the queue when `pending`)."""
        reqs = ({r.req for r in self._rows if r is not None} | set(self._deferred) | set(extra)
                | {j.req for j in self._prefilling})
        if pending:
            reqs |= set(self._pending)
            self._pending.clear()
        self._rows = [None] * self.max_batch
        self._deferred.clear()
        self._prefilling.clear()
        self._free_pages()
        for req in reqs:
            req.kv, req.shared, req.twin = None, {}, None
            self._release(req)
            if not req.future.done():
                req.future.set_exception(exc)

    def _free_pages(self) -> None:
        """No row or request holds KV pages (every one of them was failed or never started)."""
        self._pages.reset()
        # (weights key, "whole" or "page", digest) -> (shard, its pages), oldest use first (`_remember`)
        self._prefix: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        # a "page" entry's key -> the logprobs of its tokens [page] (token 0's NaN), kept while the entry is, when a
        # request that scored them cached the page: what later requests scoring the same prefix read (`_walk`)
        self._page_lp: dict[tuple, np.ndarray] = {}
        self._page_table = np.zeros((self.max_batch, self._table_width), np.int32)  # row -> its pages, in order
        self._row_pages: list[list[int] | None] = [None] * self.max_batch

    # admission ----------------------------------------------------------------------------------------

    def _bucket(self, n: int) -> int:
        return 0 if n == 0 else next(b for b in self.prefill_lengths if b >= n)

    def _admit(self) -> None:
        budget = self.prefill_token_budget  # prefill tokens per loop iteration, so decode keeps its pace
        budget -= self._advance_prefills(budget)
        self._admit_requests(budget)
        if any(job.done == 0 for job in self._prefilling):  # long prompts started this step: their first chunks
            self._advance_prefills(None)
            if self._deferred:  # those prefilled in one chunk take rows now
                self._admit_requests(0)

    def _admit_requests(self, budget: int) -> None:
        """Place prefilled requests waiting for rows, then prefill (or start the chunked prefill of) new ones while
        `budget` tokens and free rows last."""
        free = [r for r in self._row_order if self._rows[r] is None]
        while free:
            if self._deferred:  # already prefilled samples (or prompts found whole in the prefix cache) go first
                req = self._deferred[0]
                self._place([req], free)
                if req.placed < req.spec.num_samples:
                    if not self._prefilling and all(r is None for r in self._rows):
                        self._place_holders_behind(free)
                    return
                self._deferred.popleft()
                continue
            if not self._pending or budget <= 0:
                return
            batch = self._pick_batch(len(free))
            if not batch:
                return
            batch = [req for req in batch if not self._from_cache(req)]
            batch, later = self._after_batch_mates(batch)
            self._pending.extendleft(reversed(later))  # next: the prefix they share is cached by then
            if not batch:
                continue  # every one found its prompt cached: placed from _deferred
            try:
                budget -= self._prefill(batch)
            except Exception as e:  # fails only this batch: it wrote no page any other request reads (no prefill
                log.exception("sampler: prefill failed")  # here takes the pool: long prompts' chunks run later)
                err = self.explain(e)
                for req in batch:
                    self._release(req)
                    self._drop_shared(req)
                    if not req.future.done():
                        req.future.set_exception(err)
                continue
            if self._chunks(batch[0]):
                continue  # a long prompt: prefilled a chunk per step (_advance_prefills), placed from _deferred
            try:
                self._place(batch, free)
            except Exception as e:  # the cache is in doubt: fail this batch too, then the step resets the cache
                e = self.explain(e)
                for req in batch:
                    self._release(req)
                    if not req.future.done():
                        req.future.set_exception(e)
                raise
            self._deferred.extend(req for req in batch if req.placed < req.spec.num_samples)

    def _place_holders_behind(self, free: list[int]) -> None:
        """The first prefilled request waiting for pages cannot be placed, and no row runs nor prompt prefills that
        would free any: requests behind it that already hold pages (cached prefix pages, taken when they were
        prefilled) keep them until they are placed, so it would wait for ever. Those that fit take rows now; they
        finish, and let go of their pages."""
        for req in list(self._deferred)[1:]:
            if not free:
                return
            if req.shared:
                self._place([req], free)
                if req.placed == req.spec.num_samples:
                    self._deferred.remove(req)

    def _table(self, rank: int) -> _Table:
        if rank not in self._tables:
            # One table per rank in use; a new rank first frees the tables nothing currently holds, so clients
            # cycling through many ranks do not keep a table (max_adapters adapters) of each resident forever.
            if len(self._tables) >= _MAX_IDLE_TABLES:
                for r in [r for r, t in self._tables.items() if not any(t.users)]:
                    del self._tables[r]
            self._tables[rank] = _Table(self.cfg, rank, self.max_adapters, self.cache_dtype, self.placement)
        return self._tables[rank]

    def _acquire(self, req: _Request) -> bool:
        """Give the request its adapter's table slot (loading it if needed); False when the table is full."""
        if req.rank == 0 or req.table_slot:
            return True
        try:
            slot = self._table(req.rank).acquire(req.snapshot.adapter)
        except Exception as e:  # noqa: BLE001 - this adapter cannot be loaded: only its request fails
            # (not failing it would leave it queued, to fail the same way every step)
            if not isinstance(e, UserError):
                log.exception("sampler: loading an adapter failed")
                e = self.explain(e)
            if not req.future.done():
                req.future.set_exception(e)
            return False
        if slot is None:
            return False
        req.table_slot = slot
        self.stats["adapter_loads"] += 1
        return True

    def _release(self, req: _Request) -> None:
        if req.table_slot:
            self._tables[req.rank].release(req.table_slot)
            req.table_slot = 0

    def _prefill_key(self, req: _Request) -> tuple:
        return (req.group, self._bucket(len(req.spec.prompt) - 1), req.rank)

    def _pick_batch(self, n_free: int) -> list[_Request]:
        """The next prefill batch: the first request of the next tenant in rotation (whose adapter can be made
        resident), then others with the same weights group, length bucket and adapter rank."""
        live = collections.deque()
        for req in self._pending:
            if not req.future.done():  # cancelled, or failed (e.g. its adapter was refused)
                live.append(req)
        self._pending = live
        tenants = {r.tenant for r in live}
        for t in [t for t in self._tenant_turn if t not in tenants]:
            del self._tenant_turn[t]  # nothing queued: it rejoins at the back
        for t in tenants:
            self._tenant_turn.setdefault(t, None)
        first = None
        for tenant in list(self._tenant_turn):
            if tenant not in tenants:
                continue
            for req in live:
                if req.tenant != tenant:
                    continue
                # A long prompt starts only while its chunked prefill would not outnumber the free rows, and when
                # one shard has free pages for its whole prompt (its chunks write there), unless it is cached whole.
                # Short of pages, nothing after it starts either: they would take the pages that rows free, and a
                # steady flow of short requests would keep it waiting for ever.
                # Cache entries on that shard give way to it (`_make_room`) only once its adapter has a table slot:
                # a request that waits for one would otherwise evict them for nothing, step after step.
                room = None  # (shard, pages): where its chunks write pool pages (a prompt cached whole writes none)
                if self._chunks(req):
                    if len(self._prefilling) >= n_free:
                        continue
                    whole = self._whole_hit(req) is not None
                    if not whole and self._waits_for_a_prefill(req):
                        self.stats["prefill_waits_for_long_mate"] += 1
                        continue
                    room = None if whole else self._chunk_room(req)
                    if not whole and room is None:
                        self.stats["prefill_waits_for_pages"] += 1
                        return []
                if self._acquire(req):
                    if room is not None:  # what it needs beyond its cached first pages (evicting those would
                        self._make_room(*room)  # free nothing a running row still holds, and lose the hit)
                    first = req
                    break
            if first is not None:
                self._tenant_turn.move_to_end(tenant)
                break
        if first is None or not begin(first.future):
            if first is not None:
                self._release(first)
                self._pending.remove(first)
            return []
        key = self._prefill_key(first)
        T = key[1]
        fit = [b for b in self.prefill_batches if b * max(T, 1) <= self.prefill_token_budget]
        # A long prompt starts alone (its chunks then share calls with other long prompts', `_chunk_calls`).
        limit = 1 if self._chunks(first) else min(max(fit) if fit else 1, n_free)
        batch, keep = [first], collections.deque()
        for req in self._pending:
            if req is first:
                continue
            if (len(batch) < limit and self._prefill_key(req) == key and self._acquire(req)):
                if begin(req.future):
                    batch.append(req)
                else:
                    self._release(req)
            elif not req.future.cancelled():
                keep.append(req)
        self._pending = keep
        return batch

    def _after_batch_mates(self, batch: list[_Request]) -> tuple[list[_Request], list[_Request]]:
        """(now, later): the batch without the requests that begin with whole prompt pages an earlier request of it
        will prefill, which the cache does not hold yet, when prefilling only what follows them would fit a
        smaller length bucket; those go back to the front of the queue. Requests sharing a system prompt or
        few-shot prefix that arrive together then cost one whole prefill and then, in the next batch, each the
        rest after the pages the first one left cached (`_prefill_tails`), not each a whole prefill. Identical
        prompts stay (they share one prefill row, `_prefill`); a request that scores its prompt waits only for
        pages whose logprobs an earlier one computes (and only when it asks for prompt logprobs alone:
        compute_logprobs of a GRPO group's sequences), and a request waits once at most (if rows short of pages
        evicted those pages meanwhile, the mates would otherwise be prefilled one batch each)."""
        if not self.prefix_cache or len(batch) < 2 or self._chunks(batch[0]):
            return batch, []
        page = self.page_size
        now, later, same = [], [], set()
        coming, scored = set(), set()  # (weights, digest) of pages `now` will prefill; of those with logprobs
        for req in batch:
            P, w, scores = len(req.spec.prompt), self._weights_of(req.snapshot), req.spec.scores_prompt
            keys = self._page_keys(req)
            if self._uses_cache(req) and not req.waited and (scores or (req.spec.prompt, req.table_slot) not in same):
                usable = keys[: (P - 2) // page]  # at least one position left to prefill
                n = next((j for j, d in enumerate(usable) if (w, d) not in (scored if scores else coming)),
                         len(usable))
                cached = len(self._walk(req, len(usable))[1]) if self._prefix else 0
                if n > cached and self._bucket(self._rest(req, n)) < self._bucket(self._rest(req, cached)):
                    req.waited = True
                    later.append(req)
                    continue
            now.append(req)
            same.add((req.spec.prompt, req.table_slot))
            coming.update((w, d) for d in keys)
            if req.spec.wants_prompt_logprobs:
                scored.update((w, d) for d in keys)
        self.stats["prefill_waits_for_batch_mate"] += len(later)
        return now, later

    def _lora_args(self, rows: Sequence[_Request | None], n: int, compact: bool = False) -> tuple[tuple, tuple]:
        """Per rank used by `rows` (row i uses rows[i]'s adapter): the tables and [n] per-row slots.
        compact (decode, "dense" mode): each table also gives the slots in use (`active`, padded to a power of two
        with the null slot) and rows index into that (rows without an adapter of this rank: past its end, so
        their one-hot is zero); otherwise rows index the table itself (slot 0: the null adapter)."""
        ranks = sorted({r.rank for r in rows if r is not None and r.rank})
        tables, slots = [], []
        for rank in ranks:
            t = self._tables[rank]
            used = sorted({r.table_slot for r in rows if r is not None and r.rank == rank})
            active = np.zeros(1 << max(0, (len(used) - 1).bit_length()), np.int32)
            active[: len(used)] = used
            s = np.zeros(n, np.int32)
            for i, r in enumerate(rows):
                if r is not None and r.rank == rank:
                    s[i] = used.index(r.table_slot) if compact else r.table_slot
            if compact:  # rows without this rank's adapter: an index past `active`, whose one-hot is all zeros
                s[[i for i, r in enumerate(rows) if r is None or r.rank != rank]] = len(active)
            pl = self.placement
            tables.append((t.weights, t.scale, from_host(active, pl.rep)) if compact else (t.weights, t.scale))
            slots.append(from_host(s, pl.rows_sh))
        return tuple(tables), tuple(slots)

    def _prefill(self, batch: list[_Request]) -> int:
        """Prefill one batch (same weights group, length bucket and adapter rank); returns the padded token count.
        Requests with the same prompt and adapter that do not score it share one prefill row: a GRPO group sent as
        separate requests of one prompt (tinker-cookbook's RL samples each rollout alone) costs one row, and its
        requests then list one copy of the prompt's full KV pages (`_place`), as the num_samples of one request do."""
        T = self._bucket(len(batch[0].spec.prompt) - 1)
        want = any(r.spec.scores_prompt for r in batch)
        if self._chunks(batch[0]):
            return self._start_chunked(batch[0], T)
        rows: list[_Request] = []  # one per prefill row: the first request of each prompt and adapter
        row_of, first = [], {}
        for req in batch:
            key = id(req) if req.spec.scores_prompt else (req.spec.prompt, req.table_slot)
            if key in first:
                req.twin = rows[first[key]]
            else:
                first[key] = len(rows)
                rows.append(req)
            row_of.append(first[key])
        hits = [None] * len(rows) if T == 0 else self._page_hits(rows, T)
        if all(h is None for h in hits):
            return self._prefill_rows(batch, rows, row_of, T, want)

        def part(idx: list[int]) -> tuple:  # the requests of rows `idx`, those rows, and each request's row among them
            at = {i: j for j, i in enumerate(idx)}
            reqs = [(req, at[i]) for req, i in zip(batch, row_of) if i in at]
            return [r for r, _ in reqs], [rows[i] for i in idx], [j for _, j in reqs]

        # Rows that start from cached pages prefill their rests together; the others (if any), a whole prefill.
        cached = [i for i, h in enumerate(hits) if h is not None]
        used = self._prefill_tails(*part(cached), T, [hits[i] for i in cached])
        rest = [i for i, h in enumerate(hits) if h is None]
        if not rest:
            return used
        rest_batch, rest_rows, rest_row_of = part(rest)
        return used + self._prefill_rows(rest_batch, rest_rows, rest_row_of, T,
                                         any(r.spec.scores_prompt for r in rest_rows))

    def _rows_bucket(self, n: int) -> int:
        """Rows of a prefill call for n prompts: the smallest prefill_batches bucket that holds them."""
        return next((b for b in self.prefill_batches if b >= n), n)

    @staticmethod
    def _lora_mode(rows: list[_Request], Bp: int) -> str:
        """How a prefill call applies adapters: "uniform" when every one of its Bp rows has the same one (not when
        none has: the mode is a static argument, and a call without adapters needs one compiled program only)."""
        uniform = len({r.table_slot for r in rows}) == 1 and len(rows) == Bp and rows[0].rank
        return "uniform" if uniform else "gather"

    def _prefill_rows(self, batch: list[_Request], rows: list[_Request], row_of: list[int], T: int, want: bool) -> int:
        """`_prefill`'s whole-prompt prefill of `rows` (batch[j]'s row: rows[row_of[j]]) in one call."""
        Bp = self._rows_bucket(len(rows))
        if T == 0:  # one-token prompts: nothing to prefill
            scored = None
        else:
            tokens, targets, score, draws = self._prompt_arrays(rows, Bp, T)
            snap = batch[0].snapshot
            lora, slots = self._lora_args(rows + [None] * (Bp - len(rows)), Bp)
            pl = self.placement
            k, v, *scored = kernels.prefill(pl, snap.graphdef, snap.params, lora, slots, tokens, targets, score,
                                            from_host(np.bool_(want), pl.rep), topk=self.max_topk, draws=draws,
                                            cache_dtype=self.cache_dtype, mode=self._lora_mode(rows, Bp),
                                            attention=self.prefill_attention)
            # Rows may be split over processes: gathered (every process runs this step alike).
            scored = distributed.fetch(tuple(scored)) if want else None
            for req, i in zip(batch, row_of):
                req.kv = (k, v, i)
            self.stats["prefill_calls"] += 1
            self.stats["prefill_rows_shared"] += len(batch) - len(rows)
        self._prompt_outputs(batch, scored, row_of)
        return Bp * T

    def _page_hits(self, rows: list[_Request], T: int) -> list[tuple[list[int], list[int], list] | None]:
        """Per prefill row: (shards, pages, their keys) of its prompt's first full pages that the prefix cache holds
        (`_walk`), when prefilling only the rest fits a smaller length bucket than T (it shares a system prompt or
        few-shot prefix with earlier prompts, or continues a cached conversation); otherwise None."""
        if not self.prefix_cache or not self._prefix:
            return [None] * len(rows)
        page, hits = self.page_size, []
        for r in rows:  # at least one position left to prefill (a prompt found whole is served by `_from_cache`)
            h = self._walk(r, (len(r.spec.prompt) - 2) // page) if self._uses_cache(r) else None
            hits.append(h if h is not None and self._bucket(self._rest(r, len(h[1]))) < T else None)
        return hits

    def _prefill_tails(self, batch: list[_Request], rows: list[_Request], row_of: list[int], T: int,
                       hits: list) -> int:
        """`_prefill` for rows that start from cached pages: each row's cache holds its cached pages (gathered from the
        pool; `kernels.cached_rows`) and the prefill runs its remaining positions only (`kernels.prefill_part`, from
        each row's own start, in the length bucket of the longest rest). The result is a whole prompt's prefill
        (req.kv, [L,Bp,T,K,H]); each row's request lists its cached pages where they are all on one shard (`_hold`:
        `req.shared`, as if it had taken them) and copies only the rest (`_place`). -> the padded token count."""
        page, pl, snap = self.page_size, self.placement, batch[0].snapshot
        Bp = self._rows_bucket(len(rows))
        cached = [len(p) * page for _, p, _ in hits]
        starts = [len(r.spec.prompt) - 1 - self._rest(r, len(p)) for r, (_, p, _) in zip(rows, hits)]
        want = any(r.spec.scores_prompt for r in rows)
        Tt = self._bucket(max(len(r.spec.prompt) - 1 - st for r, st in zip(rows, starts)))
        cache = self._cached_cache(Bp, T, [(s, p, n) for (s, p, _), n in zip(hits, cached)])
        tokens, targets, score, draws = self._prompt_arrays(rows, Bp, T + Tt)  # room for every row's start + Tt
        lora, slots = self._lora_args(rows + [None] * (Bp - len(rows)), Bp)
        k, v, *scored = kernels.prefill_part(pl, snap.graphdef, snap.params, lora, slots, tokens, targets, score,
                                             cache, starts + [0] * (Bp - len(rows)), from_host(np.bool_(want), pl.rep),
                                             topk=self.max_topk, draws=draws, mode=self._lora_mode(rows, Bp), chunk=Tt)
        lp = distributed.fetch(scored[0]) if want else None
        for i, (req, (s, p, keys)) in enumerate(zip(rows, hits)):
            if req.spec.scores_prompt:
                req.prompt_lp = self._joined_lp(self._lps(keys), lp[i], starts[i], len(req.spec.prompt))
            self._touch(keys)
            self._hold(req, s, p)
        for req, i in zip(batch, row_of):
            req.kv = (k, v, i)
            req.cache_hit = cached[i]
            self.stats["prefix_cache_hit_tokens"] += cached[i]
        self.stats["prefill_calls"] += 1
        self.stats["prefix_cache_prefills"] += 1
        self.stats["prefill_rows_shared"] += len(batch) - len(rows)  # (requests that score their prompt: one row each)
        return Bp * Tt

    def _cached_cache(self, Bp: int, slots: int, rows: list[tuple[list[int], list[int], int]]) -> KVCache:
        """A prefill cache [L,Bp,slots,K,H] whose row i holds rows[i] = (shards, pages, positions): those cached pages
        (page j on batch shard shards[j]) at slots [0, positions); every other row and slot empty
        (`kernels.cached_rows`)."""
        W = -(-slots // self.page_size)
        shard, pages, lengths = np.zeros((Bp, W), np.int32), np.zeros((Bp, W), np.int32), np.zeros(Bp, np.int32)
        for i, (s, p, n) in enumerate(rows):
            shard[i, : len(s)], pages[i, : len(p)], lengths[i] = s, p, n
        return kernels.cached_rows(self.placement, self._pool, shard, pages, lengths, slots=slots)

    def _prompt_arrays(self, reqs: list[_Request], Bp: int, T: int) -> tuple:
        """`_host_prompt_arrays` placed over rows."""
        tokens, targets, score, draws = self._host_prompt_arrays(reqs, Bp, T)
        pl = self.placement
        return (from_host(tokens, pl.rows_sh), from_host(targets, pl.rows_sh),
                {k: from_host(v, pl.rows_sh) for k, v in score.items()}, draws)

    @staticmethod
    def _host_prompt_arrays(reqs: list[_Request], Bp: int, T: int) -> tuple:
        """Prefill inputs of `reqs` (row i: reqs[i]): tokens (prompt[:-1]) and targets (prompt[1:]) [Bp,T]; `score`
        (kernels._prompt_scores): the target_prompt_logprobs ids [Bp,T,A] (-1: none; A = 0 when no request asks),
        each row's temperature and seed words for prompt_alt_tokens_k's draws; and the draws' static width (0 when
        no request asks). -> (tokens, targets, score, draws), on the host."""
        # Static widths: the widest request's, in powers of two (a few compiled variants, no [V]-wide work per
        # position for widths nobody asked for).
        A = _pow2(max((r.spec.target_ids.shape[1] for r in reqs if r.spec.target_ids is not None), default=0))
        draws = _pow2(max(r.spec.prompt_alt_k for r in reqs))
        tokens = np.zeros((Bp, T), np.int32)
        targets = np.zeros((Bp, T), np.int32)
        ids = np.full((Bp, T, A), -1, np.int32)
        temperature = np.zeros(Bp, np.float32)
        seed = np.zeros((Bp, 2), np.uint32)
        for i, req in enumerate(reqs):
            s = req.spec
            tokens[i, : len(s.prompt) - 1] = s.prompt[:-1]
            targets[i, : len(s.prompt) - 1] = s.prompt[1:]
            if s.target_ids is not None:
                ids[i, : s.target_ids.shape[0], : s.target_ids.shape[1]] = s.target_ids
            temperature[i], seed[i] = s.temperature, (s.seed >> 32, s.seed & 0xFFFFFFFF)
        return tokens, targets, {"ids": ids, "temperature": temperature, "seed": seed}, draws

    def _chunks(self, req: _Request) -> int:
        """How many chunks the request's prompt is prefilled in (0: whole, in one call with others): those that hold
        some of its positions, not its length bucket's (a 2,100-token prompt in a 4,096 bucket runs 5 chunks of
        512, not 8)."""
        T = self._bucket(len(req.spec.prompt) - 1)
        if self.prefill_chunk is None or T <= self.prefill_chunk:
            return 0
        return -(-(len(req.spec.prompt) - 1) // self.prefill_chunk)

    def _chunk_shard(self, req: _Request) -> int | None:
        room = self._chunk_room(req)
        return None if room is None else room[0]

    def _chunk_room(self, req: _Request) -> tuple[int, int] | None:
        """(a batch shard with room for a long request's prompt (its chunks write its KV there), the free pages it
        needs there): the shard of its first pages found in the prefix cache when the rest fits there
        (`_start_chunked` lists those; only the rest is needed), else one with free pages for the whole prompt,
        else the one where evicting cached prefixes would free enough (`_make_room` does that; the request's own
        cached pages are marked used, so they go last). None when no shard has room even with every cache entry on
        it gone (the prompt waits for rows to finish). Evicts nothing."""
        need = self._prompt_pages(req)
        pg = self._pages
        if self._uses_cache(req) and self._prefix:
            shards, _, keys = self._walk(req, (len(req.spec.prompt) - 2) // self.page_size)
            rest = need - _leading(shards, shards[0]) if shards else need
            if shards and pg.free(shards[0]) >= rest:
                return shards[0], rest
            self._touch(keys)  # evicted last
        free = [pg.free(s) for s in range(pg.shards)]
        s = max(range(pg.shards), key=free.__getitem__)
        if free[s] >= need:
            return s, need
        cached = np.zeros((pg.shards, pg.per_shard), np.int32)  # holders of each page that are cache entries
        for shard, pages in self._prefix.values():
            np.add.at(cached[shard], pages, 1)
        room = [f + n for f, n in zip(free, pg.freed_without(cached))]
        s = max(range(pg.shards), key=room.__getitem__)
        return (s, need) if room[s] >= need else None

    def _make_room(self, shard: int, need: int) -> None:
        """Evict cache entries on `shard`, least recently used first, until it has `need` free pages (which
        `_chunk_shard` found they free)."""
        for key in [k for k, (s, _) in self._prefix.items() if s == shard]:
            if self._pages.free(shard) >= need:
                break
            self._forget(key)
            self.stats["prefix_cache_evictions"] += 1

    def _waits_for_a_prefill(self, req: _Request) -> bool:
        """Whether a long request (not cached whole: `_pick_batch` asks only then) waits for a long prompt in
        progress (`_prefilling`, same weights) that is writing at least a chunk of its first pages (for a request
        that scores its prompt: one that scores its own, so the pages keep their logprobs): it starts once those
        pages are cached and prefills only the rest (or nothing: the same prompt). A GRPO group's requests of a
        long prompt, or compute_logprobs of its long sequences, would otherwise each prefill the shared prompt,
        every one of them starting before the first is done."""
        if not self._prefilling or not self._uses_cache(req):
            return False
        keys, w, page = self._page_keys(req), self._weights_of(req.snapshot), self.page_size
        usable = (len(req.spec.prompt) - 2) // page
        for job in self._prefilling:
            other = job.req
            if self._weights_of(other.snapshot) != w or (req.spec.scores_prompt
                                                         and not other.spec.wants_prompt_logprobs):
                continue
            theirs = self._page_keys(other)
            n = next((j for j in range(min(usable, len(theirs))) if keys[j] != theirs[j]), min(usable, len(theirs)))
            if n * page - job.cached >= self.prefill_chunk:  # what it writes (not pages it found cached itself)
                return True
        return False

    def _prompt_pages(self, req: _Request) -> int:
        """Pages that hold a request's prompt positions 0 .. len - 2 (what its prefill writes), the last partly."""
        return -(-(len(req.spec.prompt) - 1) // self.page_size)

    def _start_chunked(self, req: _Request, T: int) -> int:
        """Begin a long prompt's prefill on the shard `_chunk_shard` found: pool pages for its prompt's positions
        there, after its first pages found in the prefix cache on that shard (the request holds those, as
        `_prefill_tails` rows do, and its chunks read them in place and skip their positions), and its padded
        inputs. Its first chunk runs at the end of this step's admission, with the other long prompts started in
        it (`_admit`). -> its share of that call's tokens (a chunk)."""
        n, C, page, pg = self._chunks(req), self.prefill_chunk, self.page_size, self._pages
        shard = self._chunk_shard(req)  # (found by _pick_batch, which made room there)
        assert shard is not None, "a long prompt started without pages (_pick_batch checks _chunk_shard)"
        hit = self._lookup(req)
        if hit is not None:  # only its cached pages that come first on that shard
            run = _leading(hit[0], shard)
            hit = (hit[0][:run], hit[1][:run], hit[2][:run]) if run else None
        cached = 0 if hit is None else len(hit[1]) * page  # positions cached
        base = len(req.spec.prompt) - 1 - self._rest(req, len(hit[1])) if hit else 0  # chunks start there
        S = n * C if base % C == 0 else (n + 1) * C  # the row's slots: room for its chunks from `base` on
        if hit is not None:
            self._hold(req, hit[0], hit[1])
            if req.spec.scores_prompt:
                req.cached_lp = self._lps(hit[2])  # (the entries may be gone by its last chunk)
            req.cache_hit = cached
            self.stats["prefix_cache_hit_tokens"] += cached
            self.stats["prefix_cache_prefills"] += 1
        left = -(-(len(req.spec.prompt) - 1 - base) // C)
        tokens, targets, score, draws = self._host_prompt_arrays([req], 1, S)
        own = pg.take(shard, self._prompt_pages(req) - len(req.shared.get(shard, [])))  # (nothing fails after it)
        listed = req.shared.get(shard, []) + own
        table = np.zeros(-(-S // page), np.int32)
        table[: len(listed)] = listed
        self.stats["kv_pages_peak"] = max(self.stats["kv_pages_peak"], pg.used())
        self._prefilling.append(_Prefilling(req, T, tokens[0], targets[0], {k: v[0] for k, v in score.items()}, draws,
                                            left, shard, own, table, base=base, cached=cached))
        return C

    def _advance_prefills(self, budget: int | None) -> int:
        """A chunk of each long prompt in progress, in calls of several prompts' chunks (`_chunk_calls`, oldest
        first) while their rows x chunk fit `budget` tokens (the first call always runs; None: the prompts started
        this step, whose first chunks `_start_chunked` counted); a finished one waits in `_deferred` for rows.
        -> tokens used."""
        jobs = [job for job in self._prefilling if budget is not None or job.done == 0]
        used = 0
        for call in self._chunk_calls(jobs):
            if budget is not None and used and used + self._chunk_rows(call) * self.prefill_chunk > budget:
                break  # (calls hold the oldest prompts first)
            try:
                used += self._run_chunks(call)
            except Exception as e:  # only these requests fail: their chunks write only their own pages (and scratch)
                if self._pool[0].is_deleted():  # the pool went into the failed call: every row's cache is gone
                    raise
                log.exception("sampler: prefill failed")
                for job in call:
                    if job in self._prefilling:  # (not one whose hand-on went through: it is placed as any other)
                        self._fail_chunked(job, e)
        return used

    def _fail_chunked(self, job: _Prefilling, e: Exception) -> None:
        """Fail a long prompt's request with `e`: its own pages, adapter slot and held prefix pages let go."""
        if job in self._prefilling:  # (not when its last chunk's hand-on failed: it let go already)
            self._prefilling.remove(job)
            self._pages.drop(job.shard, job.pages)
        if job.req in self._deferred:
            self._deferred.remove(job.req)
        job.req.kv = None
        self._release(job.req)
        self._drop_shared(job.req)
        if not job.req.future.done():
            job.req.future.set_exception(self.explain(e))

    def _chunk_calls(self, jobs: list[_Prefilling]) -> list[list[_Prefilling]]:
        """`jobs` (in order) in calls of one weights group, adapter rank and score widths (the kernel's static
        shapes), each of at most the largest prefill row bucket's share of rows on every batch shard (a long prompt's
        chunk takes a prefill row of the shard its pages are on) and of rows x attended slots within
        prefill_token_budget (a call's first job always goes in): a call's attention scores [rows, heads, chunk,
        slots] then stay within those of a whole prefill of chunk-long prompts in budget / chunk rows."""
        calls, open_calls = [], {}
        for job in jobs:
            key = (job.req.group, job.req.rank, job.draws, job.score["ids"].shape[-1])
            call = open_calls.get(key)
            if call is not None:
                rows = self._chunk_rows(call + [job])
                read = max(self._chunk_view(j)[0] for j in call + [job])
                if rows is None or rows * (read * self.page_size + self.prefill_chunk) > self.prefill_token_budget:
                    call = None
            if call is None:
                call = open_calls[key] = []
                calls.append(call)
            call.append(job)
        return calls

    def _chunk_rows(self, jobs: list[_Prefilling]) -> int | None:
        """Rows of a chunk call of `jobs`: the smallest prefill row bucket whose share of each batch shard holds the
        jobs on it (None: none does)."""
        shards = self._pages.shards
        most = max(collections.Counter(job.shard for job in jobs).values())
        return next((b for b in self.prefill_batches if b // shards >= most), None)

    def _chunk_view(self, job: _Prefilling) -> tuple[int, int]:
        """(read, write): pages of its table a long prompt's next chunk attends over (those before the chunk, its
        own keys coming apart: none for a first chunk; in powers of two, a few compiled widths, but at most its
        table's: past it they would only add masked slots to the attention) and the width of the table its writes
        index (up to the chunk's end, in powers of two; past its table, the scratch page, which nothing writes)."""
        start, page = self._chunk_start(job), self.page_size
        return (min(len(job.table), max(1, _pow2(-(-start // page)))),
                _pow2(-(-(start + self.prefill_chunk) // page)))

    def _chunk_start(self, job: _Prefilling) -> int:
        """The first prompt position of a long prompt's next chunk."""
        return job.base + job.done * self.prefill_chunk

    def _run_chunks(self, jobs: list[_Prefilling]) -> int:
        """The next chunk of each of `jobs` (`_chunk_calls`' one call) in one kernels.prefill_pages call: each a
        prefill row of its shard, its chunk's inputs cut on the host, its page tables (`_chunk_view`; the call's
        are its rows' widest) and start. -> tokens (rows x chunk)."""
        pl, C, shards = self.placement, self.prefill_chunk, self._pages.shards
        Bp = self._chunk_rows(jobs)
        per = Bp // shards
        rows: list[_Request | None] = [None] * Bp
        at, taken = [], [0] * shards
        for job in jobs:  # rows over shards, as decode's
            at.append(job.shard * per + taken[job.shard])
            taken[job.shard] += 1
            rows[at[-1]] = job.req
        starts = [self._chunk_start(job) for job in jobs]
        views = [self._chunk_view(job) for job in jobs]
        Wr, W = (max(v[i] for v in views) for i in (0, 1))
        A = jobs[0].score["ids"].shape[-1]
        tokens, targets = np.zeros((Bp, C), np.int32), np.zeros((Bp, C), np.int32)
        score = {"ids": np.full((Bp, C, A), -1, np.int32), "temperature": np.zeros(Bp, np.float32),
                 "seed": np.zeros((Bp, 2), np.uint32)}
        table, read = np.zeros((Bp, W), np.int32), np.zeros((Bp, Wr), np.int32)
        start, write_from = np.zeros(Bp, np.int32), np.zeros(Bp, np.int32)
        for job, r, st, (wr, w) in zip(jobs, at, starts, views):
            tokens[r], targets[r] = job.tokens[st: st + C], job.targets[st: st + C]
            score["ids"][r] = job.score["ids"][st: st + C]
            score["temperature"][r], score["seed"][r] = job.score["temperature"], job.score["seed"]
            table[r, : min(w, len(job.table))], read[r, :wr] = job.table[:w], job.table[:wr]  # (past: scratch)
            start[r], write_from[r] = st, max(st, job.cached)  # never into cached (shared) pages
        want = any(job.req.spec.scores_prompt for job in jobs)
        # The adapter tables as they are now (loading another adapter replaces a table's arrays); each request keeps
        # its slot in them until it finishes.
        lora, slots = self._lora_args(rows, Bp)
        snap = jobs[0].req.snapshot
        self._pool, *scored = kernels.prefill_pages(
            pl, snap.graphdef, snap.params, lora, slots, from_host(tokens, pl.rows_sh), from_host(targets, pl.rows_sh),
            {k: from_host(v, pl.rows_sh) for k, v in score.items()}, self._pool, table, start,
            from_host(np.bool_(want), pl.rep), topk=self.max_topk, draws=jobs[0].draws,
            mode=self._lora_mode([job.req for job in jobs], Bp), chunk=C, write_from=write_from, read_table=read)
        scored = distributed.fetch(tuple(scored)) if want else None
        self.stats["prefill_chunk_calls"] += 1
        for job, r in zip(jobs, at):
            if job.req.spec.scores_prompt:
                job.parts.append(tuple(x[r: r + 1] for x in scored))
            job.done += 1
            self.stats["prefill_chunks"] += 1
            if job.done == job.n:
                try:
                    self._hand_on(job)
                except Exception as e:  # this request only (its chunks are done; the others' are not touched)
                    if self._pool[0].is_deleted():
                        raise
                    log.exception("sampler: prefill failed")
                    self._fail_chunked(job, e)
        return Bp * C

    def _hand_on(self, job: _Prefilling) -> None:
        """A long prompt's last chunk is done: its prefill is handed on as a whole-prompt prefill's result (its
        pages gathered into a prefill cache, then let go), and it waits in `_deferred` for rows."""
        req = job.req
        listed = [int(p) for p in job.table if p]
        k, v = self._cached_cache(self.prefill_batches[0], job.T,
                                  [([job.shard] * len(listed), listed, len(req.spec.prompt) - 1)])
        self._prefilling.remove(job)
        self._pages.drop(job.shard, job.pages)
        req.kv = (k, v, 0)
        scored = ([np.concatenate([p[i] for p in job.parts], axis=1)[:, :job.T] for i in range(len(job.parts[0]))]
                  if req.spec.scores_prompt else None)
        if req.cached_lp is not None:  # its first positions' logprobs came with their cached pages
            req.prompt_lp = self._joined_lp(req.cached_lp, scored[0][0], job.base, len(req.spec.prompt))
            req.cached_lp = None
        else:
            self._prompt_outputs([req], scored, [0])
        self.stats["prefill_calls"] += 1
        self._deferred.append(req)

    # prefix cache -------------------------------------------------------------------------------------

    def _weights_of(self, snap: WeightSnapshot) -> tuple[int, int]:
        """A key for the exact weights a snapshot samples with: the numbers of its params and of its adapter (0: none).
        Never reused, so an entry of weights that are gone is never found again (it gives way, least recently used
        first, when rows need its pages); and alike on every process of an engine."""
        return self._group(snap), 0 if snap.adapter is None else self._serial(snap.adapter)

    def _page_keys(self, req: _Request) -> list[bytes]:
        """Digests of the request's full prompt pages (among positions 0 .. len - 2, what a prefill writes): page j's
        is of its tokens and page j - 1's digest, so it names every token up to the page's end (a 16-byte
        key per page, however long the prompt). Computed once per request."""
        if req.page_keys is None:
            req.page_keys = self._chain(np.asarray(req.spec.prompt, np.int32), (len(req.spec.prompt) - 1)
                                        // self.page_size, [])
        return req.page_keys

    def _chain(self, tokens: np.ndarray, n: int, keys: list[bytes]) -> list[bytes]:
        """`keys`, the digests of the first pages of `tokens`, continued to its first n pages."""
        keys, page = list(keys), self.page_size
        d = keys[-1] if keys else b""
        for j in range(len(keys), n):
            d = hashlib.blake2b(d + tokens[j * page:(j + 1) * page].tobytes(), digest_size=16).digest()
            keys.append(d)
        return keys

    def _whole_key(self, req: _Request) -> tuple:
        prompt = np.asarray(req.spec.prompt[:-1], np.int32)
        return self._weights_of(req.snapshot), "whole", hashlib.blake2b(prompt.tobytes(), digest_size=16).digest()

    def _remember(self, req: _Request, shard: int, pages: list[int], last: int | None) -> None:
        """Offer a request's prompt KV on `shard` (just filled from its prefill) to later requests: one entry for the
        whole prompt (its positions 0 .. len - 2, all a prefill writes) holding its full pages and `last`, the page
        with its partly filled last page (its first sample's own first page: decode writes that page only from
        position len - 1 on, so the prompt's slots in it stay), and one per full page, keyed by its digest
        (`_page_keys`) and holding that page."""
        if not self.prefix_cache or len(req.spec.prompt) < 2:
            return
        wkey = self._weights_of(req.snapshot)
        # Least recently used first: the whole prompt, then its pages from the last to the first, so that eviction
        # takes a prompt's tail before the prefix that others may share (and a page's entry outlives none of the
        # entries after it that only a walk through it can reach).
        offers = [(self._whole_key(req), pages + ([] if last is None else [last]))]
        offers += [((wkey, "page", d), [p]) for d, p in reversed(list(zip(self._page_keys(req), pages)))]
        self._offer(shard, offers)
        if req.prompt_lp is not None:  # its prompt was scored: its pages' tokens' logprobs, for later scoring
            page = self.page_size
            for j, d in enumerate(self._page_keys(req)[: len(pages)]):
                if (wkey, "page", d) in self._prefix:
                    self._page_lp.setdefault((wkey, "page", d), req.prompt_lp[j * page:(j + 1) * page].copy())

    def _offer(self, shard: int, offers: list[tuple[tuple, list[int]]]) -> None:
        """New cache entries (key, its pages on `shard`), in that order of use; a key cached already is only
        marked used (it keeps its pages). Then the least recently used go while there are too many."""
        for key, held in offers:
            if key in self._prefix:
                self._prefix.move_to_end(key)
                continue
            self._pages.share(shard, held)
            self._prefix[key] = (shard, held)
        while len(self._prefix) > _MAX_PREFIXES:
            self._forget_oldest()

    def _remember_row(self, r: int, row: _Row) -> None:
        """Offer a finishing row's full pages, its prompt's and those its sampled tokens filled, to later requests,
        keyed by the digests of its prompt and tokens (`_page_keys`' chain, continued): a conversation's next turn
        (this prompt, this answer, then more) then prefills only what is new, not the answer again. Its KV holds
        positions 0 .. len(prompt) + len(tokens) - 2 (the last token sampled is never fed back; a stop string cuts
        `tokens` before what the device fed after it, so no claimed page holds those)."""
        req = row.req
        if not self.prefix_cache:
            return
        P, page, pages = len(req.spec.prompt), self.page_size, self._row_pages[r]
        full = min((P - 1 + len(row.tokens)) // page, len(pages))
        keys = self._page_keys(req)
        if full <= len(keys):
            return  # no page past the prompt's full ones: `_remember` offered those
        keys = self._chain(np.asarray(list(req.spec.prompt) + list(row.tokens), np.int32), full, keys)
        wkey = self._weights_of(req.snapshot)
        # as `_remember`: the first page becomes the most recently used
        self._offer(r // (self.max_batch // self._pages.shards),
                    [((wkey, "page", keys[j]), [pages[j]]) for j in range(full - 1, -1, -1)])

    def _walk(self, req: _Request, limit: int) -> tuple[list[int], list[int], list]:
        """(shards, pages, their keys) of the longest run of the request's first full prompt pages, at most `limit`,
        that the prefix cache holds with its weights (page j on batch shard shards[j]: a prompt's pages are cached
        where its first sample ran, a finished row's where it ran); ([], [], []) if none. Entries are not touched
        (`_touch` the ones used)."""
        wkey, scores = self._weights_of(req.snapshot), req.spec.scores_prompt
        shards, pages, keys = [], [], []
        for d in self._page_keys(req)[: max(limit, 0)]:
            key = (wkey, "page", d)
            hit = self._prefix.get(key)
            if hit is None or (scores and key not in self._page_lp):  # scoring: only pages with their logprobs
                break
            shards.append(hit[0])
            pages.append(hit[1][0])
            keys.append(key)
        return shards, pages, keys

    def _hold(self, req: _Request, shards: list[int], pages: list[int]) -> None:
        """The request lists its cached pages (`_place`: it copies only the rest to a row on their shard) when they
        are all on one shard, holding them as if it had taken them; pages on several shards are only read (its
        prefill gathered them; its rows get copies)."""
        if pages and len(set(shards)) == 1:
            req.shared = {shards[0]: list(pages)}
            self._pages.share(shards[0], req.shared[shards[0]])

    def _touch(self, keys: list) -> None:
        """Entries just used become the most recently used, the first page last (so it is evicted after the rest)."""
        for key in reversed(keys):
            self._prefix.move_to_end(key)

    def _from_cache(self, req: _Request) -> bool:
        """Serve a request whose whole prompt (what a prefill would write) is in the prefix cache without a prefill:
        its prefill result is gathered from the cached pages, the request lists the full ones on their shard (as if
        it had copied them there) and waits in `_deferred` for rows. A GRPO group sent as separate requests (as
        tinker-cookbook's RL loop sends it) then costs one prefill even when its requests come one by one, and so
        does a prompt sampled again. False when not cached (or it scores its prompt: cached positions have no
        scores); a failure fails only this request (True: nothing more to do with it)."""
        P = len(req.spec.prompt)
        key = self._whole_hit(req)
        if key is None:
            return False
        self._prefix.move_to_end(key)
        shard, pages = self._prefix[key]
        T, page = self._bucket(P - 1), self.page_size
        try:  # the prefill's shape: its bucket's slots, the smallest prefill batch's rows
            k, v = self._cached_cache(self.prefill_batches[0], T, [([shard] * len(pages), pages, P - 1)])
        except Exception as e:  # noqa: BLE001 - only this request fails; the pool was only read
            log.exception("sampler: reading a cached prompt failed")
            self._release(req)
            req.future.set_exception(self.explain(e))
            return True
        req.kv = (k, v, 0)
        req.shared = {shard: pages[: (P - 1) // page]}
        self._pages.share(shard, req.shared[shard])  # the request's own hold, as if it had taken them
        req.cache_hit = P - 1
        self._prompt_outputs([req], None)
        self.stats["prompt_cache_hits"] += 1
        self.stats["prefix_cache_hit_tokens"] += P - 1
        self._deferred.append(req)
        return True

    def _whole_hit(self, req: _Request) -> tuple | None:
        """The prefix cache's key of the request's whole prompt when it holds it and may serve it (`_from_cache`:
        not for a request that scores its prompt); None otherwise. Not touched."""
        if not self.prefix_cache or req.spec.scores_prompt or len(req.spec.prompt) < 2 or not self._prefix:
            return None
        key = self._whole_key(req)
        return key if key in self._prefix else None

    def _lookup(self, req: _Request) -> tuple[list[int], list[int], list] | None:
        """(shards, pages, keys) of a long prompt's first full pages that the prefix cache holds with its weights
        (`_walk`, leaving at least one prompt position to prefill), used; None if none (or it scores its prompt
        for more than its logprobs, `_uses_cache`)."""
        if not self._uses_cache(req) or not self._prefix:
            return None
        shards, pages, keys = self._walk(req, (len(req.spec.prompt) - 2) // self.page_size)
        if not pages:
            return None
        self._touch(keys)
        return shards, pages, keys

    def _uses_cache(self, req: _Request) -> bool:
        """Whether the request may start from cached prompt pages: any that does not score its prompt, and one that
        asks for its prompt's logprobs alone, from pages cached with theirs (`_page_lp`); not one asking for top-k,
        target ids or draws at each position, which cached pages do not keep."""
        return self.prefix_cache and (not req.spec.scores_prompt or req.spec.scores_prompt_logprobs_only)

    def _rest(self, req: _Request, n: int) -> int:
        """Prompt positions a request prefills after its first n pages came from the cache: from the first position
        after them; from the last cached one when it scores its prompt (its query gives the first uncached token's
        logprob; its key and value are not written back, `kernels._prefill_pages`' write_from)."""
        return len(req.spec.prompt) - 1 - n * self.page_size + (1 if n and req.spec.scores_prompt else 0)

    def _lps(self, keys: list) -> np.ndarray:
        """The logprobs of the tokens of cached pages `keys` (the first of the prompt on), [len(keys) * page]."""
        return np.concatenate([self._page_lp[k] for k in keys])

    @staticmethod
    def _joined_lp(cached: np.ndarray, part: np.ndarray, start: int, P: int) -> np.ndarray:
        """A prompt's logprobs [P] (NaN at 0) from its cached pages' (`cached`, tokens 0 .. start) and those its
        prefill computed from position `start` on (`part`: position start + i scores token start + i + 1)."""
        out = np.full((P,), np.nan, np.float32)
        out[1: start + 1] = cached[1: start + 1]
        out[start + 1:] = part[: P - 1 - start]
        return out

    def _forget(self, key: tuple) -> None:
        shard, pages = self._prefix.pop(key)
        self._page_lp.pop(key, None)
        self._pages.drop(shard, pages)

    def _forget_oldest(self) -> None:
        self._forget(next(iter(self._prefix)))
        self.stats["prefix_cache_evictions"] += 1

    def _prompt_outputs(self, batch: list[_Request], scored, row_of: list[int] | None = None) -> None:
        """Each request's prompt logprobs, their top-k, target_prompt_logprobs and prompt_alt_tokens, as asked,
        from its prefill's `_prompt_scores` outputs (batch[j]'s row: row_of[j], default j; None: nothing was
        scored, a 1-token prompt)."""
        lp, ids, tlp, alp, drawn, dlp = scored if scored is not None else (None,) * 6
        for i, req in zip(row_of if row_of is not None else range(len(batch)), batch):
            P = len(req.spec.prompt)
            if req.spec.target_ids is not None:
                tid = req.spec.target_ids  # [P-1, K]
                got = np.zeros(tid.shape, np.float32) if alp is None else alp[i, : P - 1, : tid.shape[1]]
                req.target = response.target_logprobs(got, tid, req.spec.target_layout)
            k = req.spec.prompt_alt_k
            if k:
                req.alt = response.prompt_alt_tokens(
                    np.zeros((P - 1, k), np.int64) if drawn is None else drawn[i, : P - 1, :k],
                    np.zeros((P - 1, k), np.float32) if dlp is None else dlp[i, : P - 1, :k])
            if req.spec.wants_prompt_logprobs:
                req.prompt_lp = response.prompt_logprobs_array(None if lp is None else lp[i], P)
            if req.spec.topk_prompt_logprobs:
                req.topk = response.topk_prompt_logprobs(None if ids is None else ids[i],
                                                         None if tlp is None else tlp[i], P,
                                                         req.spec.topk_prompt_logprobs)

    def _place(self, reqs: list[_Request], free: list[int]) -> None:
        """Give free rows to the requests' unplaced samples, in order, while rows and KV pages last: each sample's
        row lists its request's full prompt pages on the row's shard (copied there from the prefill for the
        request's first sample on that shard, shared by the rest, and by its prefill twins' samples while it holds
        them) and pages of its own, the first of which gets a
        copy of the prompt's partly filled last page. A sample that finds no row with enough free pages on its
        shard waits, and so does everything after it (so at most one request takes shared pages here without rows;
        requests prefilled from cached pages hold those from their prefill on: `_place_holders_behind`)."""
        pg, page, per = self._pages, self.page_size, self.max_batch // self._pages.shards
        # Pages to copy from each prefill result (a batch's, or the two of a batch split by `_prefill`): id of its k
        # -> ((k, v), per shard [(prefill row, its page, dest)])
        copies: dict[int, tuple] = {}

        def entries(req: _Request) -> list[list[tuple[int, int, int]]]:
            return copies.setdefault(id(req.kv[0]), (req.kv, [[] for _ in range(pg.shards)]))[1]

        running = any(r is not None for r in self._rows)
        for req in reqs:
            need, n_shared = self._page_needs(req.spec)
            partial = req.kv is not None and (len(req.spec.prompt) - 1) % page != 0
            twin = req.twin

            def held(s: int) -> int:  # how many of its full prompt pages on shard s are there to list (its own
                #                        or its twin's: all of them, or the first ones, found in the prefix cache)
                return len(req.shared[s]) if s in req.shared else len(twin.shared[s]) if (
                    twin is not None and s in twin.shared) else 0

            while req.placed < req.spec.num_samples:
                r = next((r for r in free if pg.free(r // per) >= need - held(r // per)), None)
                if r is None and free and self._prefix:  # cached prefixes give way to work
                    self._forget_oldest()
                    continue
                if r is None:
                    self.stats["kv_page_waits"] += bool(free)
                    break
                free.remove(r)
                s = r // per
                if s not in req.shared and twin is not None and s in twin.shared:  # its twin's: listed, not copied
                    req.shared[s] = list(twin.shared[s])
                    pg.share(s, req.shared[s])  # the request's own hold, as if it had taken them
                have = req.shared.get(s, [])
                first_here = s not in req.shared or len(have) < n_shared
                if first_here:  # the request's first sample on this shard: its full prompt pages (after any cached)
                    new = pg.take(s, n_shared - len(have))
                    if req.kv is not None:
                        entries(req)[s] += [(req.kv[2], j, p) for j, p in enumerate(new, len(have))]
                    req.shared[s] = have + new
                    self.stats["kv_pages_shared"] += len(have)
                else:
                    self.stats["kv_pages_shared"] += n_shared
                pg.share(s, req.shared[s])
                own = pg.take(s, need - n_shared)
                if partial:
                    entries(req)[s].append((req.kv[2], n_shared, own[0]))
                if first_here and req.kv is not None:
                    self._remember(req, s, req.shared[s], own[0] if partial else None)
                self._row_pages[r] = req.shared[s] + own
                self._page_table[r] = 0
                self._page_table[r, :need] = self._row_pages[r]
                self._start_row(r, req, req.placed)
                req.placed += 1
                self.stats["rows_started"] += 1
                self.stats["rows_joined_running_batch"] += running
            if req.placed < req.spec.num_samples:
                break
        for kv, per_shard in copies.values():
            M = max(len(e) for e in per_shard)
            if not M:
                continue
            M = _pow2(M)
            src, page_of, dest = (np.zeros((pg.shards, M), np.int32), np.zeros((pg.shards, M), np.int32),
                                  np.full((pg.shards, M), pg.per_shard, np.int32))  # dest Pn: padding, dropped
            for s, e in enumerate(per_shard):
                if e:
                    src[s, : len(e)], page_of[s, : len(e)], dest[s, : len(e)] = zip(*e)
            self.stats["kv_pages_copied"] += sum(len(e) for e in per_shard)
            sh = self.placement.shard_sh
            self._pool = kernels.insert_pages(self.placement, self._pool, kv[0], kv[1], from_host(src, sh),
                                              from_host(page_of, sh), from_host(dest, sh))
        self.stats["kv_pages_peak"] = max(self.stats["kv_pages_peak"], pg.used())
        for req in reqs:
            if req.placed == req.spec.num_samples:
                req.kv = req.twin = None
                self._drop_shared(req)

    def _drop_shared(self, req: _Request) -> None:
        """The request lets go of its prompt pages (its rows still hold theirs)."""
        for s, pages in req.shared.items():
            self._pages.drop(s, pages)
        req.shared = {}

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
        p["topk_n"][r] = s.topk_sample_logprobs
        self._par_dev = None  # placed again before the next decode call

    # decode -------------------------------------------------------------------------------------------

    def _decode_round(self) -> None:
        rows = self._rows
        live = [r for r in range(self.max_batch) if rows[r] is not None and self._dyn["live"][r]]
        if not live:
            return
        groups = {rows[r].req.group: rows[r].req.snapshot for r in live}
        order = sorted(groups)
        key = next((g for g in order if g > self._last_group), order[0])  # round-robin between weight groups
        self._last_group = key
        snap = groups[key]
        run = np.array([rows[r] is not None and rows[r].req.group == key
                        for r in range(self.max_batch)])
        # Slots this call can touch: below max(pos) + decode_steps (and below max_seq_len).
        need = int(self._dyn["pos"][run & self._dyn["live"]].max()) + self.decode_steps
        view = next(b for b in self.decode_lengths if b >= min(need, self.max_seq_len))
        # Row bucket: powers of 4 (1, 4, 16, ...) per shard up to its max_batch / shards rows, covering the highest
        # running row of any shard; free rows are handed out lowest first on every shard in turn, so light load
        # decodes a few rows per device, not max_batch.
        pl = self.placement
        per = self.max_batch // pl.shards
        top = int(max(r % per for r in np.flatnonzero(run))) + 1
        n_rows = next((b for b in (4 ** i for i in range(16)) if b >= top and b < per), per)
        lora, slots = self._lora_args([rows[r].req if run[r] else None for r in range(self.max_batch)],
                                      self.max_batch, compact=True)
        if self._par_dev is None:  # fixed while rows run: placed when a row starts, not every call
            self._par_dev = {k: from_host(v, pl.rows_sh) for k, v in self._par.items()}
        # Requests waiting for a row (pending or holding a prefill) end the call as soon as a row frees; otherwise it
        # runs until its rows finish or decode_steps. Both lists are alike on every process (step order).
        waiting = bool(self._pending or self._deferred)
        pages = -(-view // self.page_size)
        t0 = time.perf_counter()
        pool, dyn, toks, lps, valid, n_run, tk_ids, tk_lps = kernels.decode(
            pl, snap.graphdef, snap.params, lora, slots, self._pool, from_host(self._page_table, pl.rows_sh),
            {k: from_host(v, pl.rows_sh) for k, v in self._dyn.items()}, self._par_dev, from_host(run, pl.rows_sh),
            n_steps=self.decode_steps, pages=None if pages >= self._table_width else pages,
            unroll=self.decode_unroll, rows=None if n_rows >= per else n_rows, until_finish=waiting,
            attention=self.decode_attention,
            topk=self.max_topk)
        self._pool = pool
        # Replicated outputs (kernels.decode): every process can read them whole.
        dyn, toks, lps, valid, n_run, tk_ids, tk_lps = jax.device_get((dyn, toks, lps, valid, n_run, tk_ids, tk_lps))
        # From dispatch until the outputs are on the host: the device's decode steps, plus any prefill still queued
        # ahead of them (dispatch is asynchronous). The loop's wall time minus this is host work (benchmarks).
        self.stats["decode_seconds"] += time.perf_counter() - t0
        self._dyn = {k: np.array(v) for k, v in dyn.items()}
        self.stats["decode_calls"] += 1
        self.stats["decode_steps_run"] += int(n_run)
        self.stats["last_decode_rows"] = n_rows * pl.shards
        self.stats["max_live_rows"] = max(self.stats["max_live_rows"], int(run.sum()))
        for r in np.flatnonzero(run):
            row = rows[r]
            reason = None
            for i in range(toks.shape[0]):
                if not valid[i, r]:
                    break
                row.tokens.append(int(toks[i, r]))
                row.logprobs.append(float(lps[i, r]))
                k = row.req.spec.topk_sample_logprobs
                if k:
                    row.topk.append((tk_ids[i, r, :k].copy(), tk_lps[i, r, :k].copy()))  # not views of the call's
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
        self._remember_row(r, row)
        self._pages.drop(r // (self.max_batch // self._pages.shards), self._row_pages[r])
        self._row_pages[r] = None
        self._page_table[r] = 0
        req = row.req
        req.results[row.sample] = response.sequence(row.tokens, row.logprobs, reason, req.sequence_ids[row.sample],
                                                    row.topk if req.spec.topk_sample_logprobs else None)
        req.done += 1
        if req.done == req.spec.num_samples:
            self._release(req)
            if not req.future.done():
                req.future.set_result(response.sample_response(req.results, req.prompt_lp, req.topk, req.target,
                                                               req.alt, cache_hit=req.cache_hit))
