"""Jitted sampling kernels: prefill, decode (several steps per call), cache row insertion, token choice.

Shapes are fixed per Sampler (rows B, KV pool pages, table width W) or bucketed (prefill rows Bp, prefill length
T), and every per-request knob (temperature, top_k, top_p, seed, max_tokens, stop ids) is an array, so
new values never recompile. Weights enter as (graphdef static, params) arguments; LoRA adapters as per-rank tables
(`lora`: a tuple of (weights {proj: {"a": [L,S,in,R], "b": ...}}, scale [S,P]) per rank, models.lora) and, per
row, its table slot per rank (`slots`: a tuple of [B] int32; 0 is the null adapter). Rows of different adapters
(and rows of the bare base model) therefore share one prefill or decode call.

Cache layout: the decode rows' cache is paged (models.decoder.PagedKV): a pool k/v [L,n,Pn,page,K,H] of pages
and, per row, a table [W] of its pages in position order (the Sampler hands pages out and shares a prompt's full
pages between its samples). A prefill computes a dense cache of its own rows (KVCache [L,Bp,T,K,H]) and
`insert_pages` copies its pages into the pool; a long prompt's chunks (`prefill_pages`) write into pool pages.
Page 0 of each shard is a scratch page: rows that are idle, finished or in another snapshot's group write there,
and no table of a running row lists it. A decode call may attend over only the first pages of every table
(`pages`), see `decode`.

Placement (`Placement`): every kernel runs over the sampler's mesh with explicit in_shardings / out_shardings, by the
training rule table (models.sharding): the cache rows B over the batch mesh axes (data, expert, fsdp) and kv heads K
over tensor where they divide (`cache_sharding`), adapter tables like training's adapter pools (`pool_shardings`), the
base weights as loaded (`state_shardings`), per-row inputs over rows. What the host reads back (tokens, logprobs,
row state, prompt logprobs) comes out replicated: small, and readable on every process of a multi-process mesh.
A kernel is one `Kernel`: a jax.jit per placement and argument structure (in_shardings must match the arguments'
pytree), all sharing one body; `_cache_size()` counts the compiled programs of them all.

Rows and shards. B is a multiple of the batch shards n (the Sampler rounds max_batch up), so every device holds
B/n consecutive rows. A decode call on fewer rows (`rows` = r per shard) works on the first r rows *of every
shard* (a reshape [B] -> [n, B/n], local on each device), never on rows [0, r*n), which would move cache rows
between devices; the Sampler hands out free rows round-robin over the shards to match.

Reported logprobs ("the documented relation"): the logprob of a sampled token is taken from the distribution
it was drawn from *after temperature*, log_softmax(logits / T)[token], over the full vocabulary (top_k /
top_p truncation is not renormalised into it). Source: John Schulman in tinker-cookbook PR #86
(2025-11-17): "we're returning the same logprobs used for sampling, even when temperature scaling is
applied"; the cookbook's RL config warns that non-1 temperatures "do not play well with KL penalty" for the
same reason (tinker-cookbook issue #689). Greedy (T = 0) reports the untempered log_softmax(logits)[token].
Prompt logprobs are always untempered (T = 1): `compute_logprobs` sends temperature 1 and they must agree
with the trainer's forward pass.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tinker_jax.models import lora as lora_math
from tinker_jax.models.config import ModelConfig
from tinker_jax.models.decoder import KVCache, PagedKV, PoolSharding, merge
from tinker_jax.models.lora import LoraRows, take_slots
from tinker_jax.models.sharding import (DEFAULT_RULES, batch_shards, cache_sharding, from_host, kv_pool_sharding,
                                        pool_shardings, replicated, rules_key, spec_for, state_shardings)

PRNG_IMPL = "threefry2x32"  # fixed, so key data is [2] uint32 whatever jax_default_prng_impl says


# ------------------------------------------------------------------------------------------ token choice


def row_keys(seed_words: jax.Array, sample_idx: jax.Array, step: jax.Array) -> jax.Array:
    """seed_words [B,2] uint32, sample_idx [B], step [B] -> [B] keys. Depends only on the row's own values."""

    def one(words, s, t):
        key = jax.random.wrap_key_data(words, impl=PRNG_IMPL)
        return jax.random.fold_in(jax.random.fold_in(key, s), t)

    return jax.vmap(one)(seed_words, sample_idx, step)


def _truncate(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """scaled [B,V]; keep the top_k tokens (0 = all), then the smallest prefix of those whose mass reaches
    top_p (the order transformers and vLLM use). Everything else -> -inf. Ties at the threshold are kept."""
    V = scaled.shape[-1]
    srt = -jnp.sort(-scaled, axis=-1)  # [B,V] descending
    k = jnp.where(top_k <= 0, V, jnp.minimum(top_k, V))  # [B]
    in_k = jnp.arange(V)[None, :] < k[:, None]
    p = jax.nn.softmax(jnp.where(in_k, srt, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(p, axis=-1) - p
    in_p = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)  # top_p = 1: no fp32 rounding cut
    n_keep = jnp.sum(in_k & in_p, axis=-1)  # >= 1: top_p > 0
    thresh = jnp.take_along_axis(srt, (n_keep - 1)[:, None], axis=-1)  # [B,1]
    return jnp.where(scaled >= thresh, scaled, -jnp.inf)


def tempered(logits: jax.Array, temperature: jax.Array) -> jax.Array:
    """logits [R,...,V] / each row's temperature [R], untempered for greedy rows (T <= 0): the distribution whose
    log_softmax a sampled token's logprob is reported from (the module docstring's relation)."""
    t = jnp.where(temperature <= 0, 1.0, temperature)
    # Shifted by the row's max first (log_softmax does the same, so at T = 1 nothing changes, bit for bit): a tiny T
    # would otherwise turn logits / T into +-inf and every logprob into inf or NaN.
    shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    return shifted / t.reshape(t.shape + (1,) * (logits.ndim - 1))


def select_tokens(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [B,V] fp32, per-row temperature/top_k/top_p [B], keys [B] -> (tokens [B] int32, logprobs [B]).

    T = 0 is argmax (first index on ties, as torch). Otherwise Gumbel-max over the truncated logits / T; the
    noise comes from the row's own key only, so a row's draw does not depend on its batch.
    """
    V = logits.shape[-1]
    greedy = temperature <= 0
    scaled = tempered(logits, temperature)
    needs_cut = ~greedy & (((top_k > 0) & (top_k < V)) | (top_p < 1.0))
    # Skip the full-vocabulary sort when no row truncates (the common RL setting).
    cut = jax.lax.cond(jnp.any(needs_cut), lambda s: _truncate(s, top_k, top_p), lambda s: s, scaled)
    cut = jnp.where(needs_cut[:, None], cut, scaled)
    # All-greedy batches (evaluation, benchmarks) skip drawing [B,V] Gumbel noise.
    sampled = jax.lax.cond(
        jnp.all(greedy), lambda: jnp.zeros(logits.shape[:1], jnp.int32),
        lambda: jnp.argmax(cut + jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys),
                           axis=-1).astype(jnp.int32))
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs


# ---------------------------------------------------------------------------------------------- placement


class Placement:
    """Where one sampler's arrays live on its mesh, by a logical-axis rule table (models.sharding).

    rows: the cache's row count B (a multiple of `shards`, the batch mesh axes' size). Shardings:
    `rows_sh` any per-row array [B, ...] (and prefill rows [Bp, ...], Bp a multiple of `shards`); `cache` a prefill's
    dense cache k / v [L,Bp,T,K,H]; `pool` the paged pool k / v [L,n,Pn,page,K,H]; `shard_sh` per-shard arrays
    [n, ...]; `rep` replicated (what the host reads back);
    `table(rank, capacity)` / `adapter(rank)` LoRA weights with / without the slot axis; `params(state)` the base
    weights. `key` identifies the placement in the compiled-program caches: its mesh and rules, the XLA
    `compiler_options` its kernels compile with, and the model's config, since the shardings above follow the
    model (an adapter table's leaves, kv heads that divide over tensor or not): two models served by one process
    must not share a kernel variant built for the other's shardings.
    """

    def __init__(self, mesh: Mesh, cfg: ModelConfig, rows: int, rules=DEFAULT_RULES,
                 compiler_options: dict | None = None):
        self.mesh, self.cfg, self.rules = mesh, cfg, rules
        self.shards = batch_shards(mesh, rules)
        if rows % self.shards:
            raise ValueError(f"placement: {rows} rows do not divide over the {self.shards} batch shards")
        self.compiler_options = tuple(sorted((compiler_options or {}).items()))  # XLA options of every kernel
        self.key = (mesh, rules_key(rules), self.compiler_options, cfg)
        self.rows_sh = NamedSharding(mesh, spec_for(("batch",), (rows,), mesh, rules))
        self.rep = replicated(mesh)
        self.cache = cache_sharding((cfg.n_layers, rows, 1, cfg.n_kv_heads, cfg.head_dim), mesh, rules)
        self.shard_sh = NamedSharding(mesh, spec_for(("batch", None), (self.shards, 1), mesh, rules))  # [n, ...]
        self.pool = kv_pool_sharding((cfg.n_layers, self.shards, 1, 1, cfg.n_kv_heads, cfg.head_dim), mesh, rules)
        self._params: dict[Hashable, Any] = {}

    def table(self, rank: int, capacity: int) -> dict:
        shapes = lora_math.shapes(self.cfg, rank, capacity)
        return pool_shardings({n: {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in w.items()}
                               for n, w in shapes.items()}, self.mesh, self.rules)

    def adapter(self, rank: int) -> dict:
        shapes = lora_math.shapes(self.cfg, rank)
        return pool_shardings({n: {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in w.items()}
                               for n, w in shapes.items()}, self.mesh, self.rules)

    def params(self, graphdef, params) -> Any:
        """The shardings the rules give `params` (an nnx.State of graphdef's Decoder), computed once per graphdef."""
        sh = self._params.get(graphdef)
        if sh is None:
            sh = self._params[graphdef] = state_shardings(params, self.mesh, self.rules)
        return sh

    def misplaced(self, graphdef, params) -> str | None:
        """None when every weight is placed as the rules say (or equivalently), else the first one that is not: the
        kernels would refuse it (a silent reshard would copy the whole model per call)."""
        sh = self.params(graphdef, params)
        for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(sh)):
            if not x.sharding.is_equivalent_to(s, x.ndim):
                return f"{jax.tree_util.keystr(path)} is placed {x.sharding}, the mesh rules say {s.spec}"
        return None


class Kernel:
    """One kernel's jitted programs: a jax.jit per variant key (placement and argument structure: in_shardings
    must match the arguments' pytree), built by `on`. Every variant shares the body, so `_cache_size()` counts the
    compiled programs of the kernel as one jax.jit's would (tests check that new values never recompile)."""

    def __init__(self, fn: Callable, **jit_kw):
        self.fn, self.jit_kw = fn, jit_kw
        self._variants: dict[Hashable, Any] = {}
        self._lock = threading.Lock()  # samplers of several base models build variants on their own threads

    def on(self, pl: "Placement", key: Hashable, shardings: Callable[[], tuple], **bind):
        """The jitted variant for placement `pl` and `key`; `shardings()` -> (in_shardings, out_shardings) and
        `bind` (constants of the placement, e.g. the mesh) are used only when the variant is first built."""
        key = (pl.key, key)
        f = self._variants.get(key)
        if f is None:
            with self._lock:
                f = self._variants.get(key)
                if f is None:
                    ins, outs = shardings()
                    fn = partial(self.fn, **bind) if bind else self.fn
                    f = self._variants[key] = jax.jit(fn, in_shardings=ins, out_shardings=outs,
                                                      compiler_options=dict(pl.compiler_options) or None,
                                                      **self.jit_kw)
        return f

    def _cache_size(self) -> int:
        return sum(f._cache_size() for f in list(self._variants.values()))


def _shard_rows(x: jax.Array, shards: int, r: int, axis: int = 0) -> jax.Array:
    """[.., B, ..] -> [.., shards * r, ..]: the first r rows of every shard (local on each device)."""
    B = x.shape[axis]
    if r * shards == B:
        return x
    y = x.reshape(x.shape[:axis] + (shards, B // shards) + x.shape[axis + 1:])
    y = jax.lax.slice_in_dim(y, 0, r, axis=axis + 1)
    return y.reshape(x.shape[:axis] + (shards * r,) + x.shape[axis + 1:])


def _set_shard_rows(full: jax.Array, part: jax.Array, shards: int, r: int, axis: int = 0) -> jax.Array:
    """The inverse of _shard_rows: `full` with the first r rows of every shard set to `part`; part's later dims
    may be shorter than full's (a prefix, e.g. the cache slots a decode view covered)."""
    B = full.shape[axis]
    if r * shards == B and part.shape == full.shape:
        return part
    split = lambda x, n: x.reshape(x.shape[:axis] + (shards, n) + x.shape[axis + 1:])  # noqa: E731
    idx = (slice(None),) * (axis + 1) + (slice(0, r),) + tuple(slice(0, n) for n in part.shape[axis + 1:])
    return split(full, B // shards).at[idx].set(split(part, r)).reshape(full.shape)


# ------------------------------------------------------------------------------------------------ prefill


def _chunk(T: int, target: int = 256) -> int:
    """Largest divisor of T that is <= target: prompt logprobs are computed T-chunk by T-chunk so the
    [Bp, T, V] logits never exist at once."""
    return max(c for c in range(1, min(T, target) + 1) if T % c == 0)


def lora_rows(lora: tuple, slots: tuple, rows: int, mode: str) -> tuple[LoraRows, ...]:
    """The decoder's per-rank LoraRows for rows [0, rows) with table slots `slots` (each [>= rows])."""
    return tuple(LoraRows(w, scale, s[:rows], 0, rows, mode) for (w, scale), s in zip(lora, slots))


def _prefill(graphdef, params, lora, slots, tokens, targets, score: dict, want_logprobs, topk: int, draws: int,
             cache_dtype, mode: str, attention: str = "einsum"):
    """Run prompt tokens [Bp,T] (prompt[:-1], right-padded) at positions 0..T-1; their keys and values are the
    prompt's cache [Bp,T] (each row attends causally over its own keys, nothing else).

    targets [Bp,T] = prompt[1:] padded; `score`: what else each row asks of the prompt (`_prompt_scores`);
    want_logprobs: bool scalar (a runtime switch, not a recompile). Returns (k, v [L,Bp,T,K,H], then
    `_prompt_scores`' outputs). Padding writes garbage into slots >= its row's length; the decode step that later
    feeds the last prompt token overwrites each such slot before any query can attend to it. (Prompts longer than
    the sampler's prefill_chunk go through `_prefill_pages` instead, a chunk per step.) `attention`: the decoder's
    no-cache implementation (models.decoder.ATTENTION_IMPLS; "cudnn": flash attention on a GPU).
    """
    model = merge(graphdef, params)
    Bp, T = tokens.shape
    rows = lora_rows(lora, slots, Bp, mode)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (Bp, T))
    # Each row one right-padded prompt: causal attention over its own keys (no context), as training attends.
    hidden, (k, v) = model(tokens, positions, lora=rows, attention=attention, kv_out=True)  # [Bp,T,D]; [L,Bp,T,K,H]
    return (k.astype(cache_dtype), v.astype(cache_dtype),
            *_prompt_scores(model, rows, hidden, targets, positions, score, want_logprobs, topk, draws))


def _prompt_scores(model, rows, hidden, targets, positions, score: dict, want_logprobs, topk: int, draws: int):
    """What a prefill reports about the prompt, from hidden [Bp,T,D] (row b, position t predicts targets[b, t]):
    - the logprob of each target [Bp,T], and the top-k ids and logprobs [Bp,T,topk] (prompt logprobs);
    - the logprobs of score["ids"] [Bp,T,A] (SDK target_prompt_logprobs; 0.0 where an id is -1);
    - `draws` tokens per position drawn with replacement at the row's score["temperature"] [Bp] (argmax at 0),
      keyed by its score["seed"] [Bp,2] words, the absolute position and the draw, with their logprobs under that
      same tempered distribution (untempered at 0), [Bp,T,draws] each (SDK prompt_alt_tokens_k).
    Computed chunk by chunk of T so the [Bp,T,V] logits never exist at once; zeros unless want_logprobs."""
    Bp, T = targets.shape
    A = score["ids"].shape[-1]

    def logprobs(_):
        C = _chunk(T)
        split = lambda x: x.reshape(Bp, T // C, C, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731 - [T/C, Bp, C, ...]
        greedy = score["temperature"] <= 0

        def one(args):
            h, tgt, ids_c, pos = args
            logits = model.logits(h, rows)  # [Bp,C,V] fp32
            lse = jax.nn.logsumexp(logits, axis=-1)
            lp = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0] - lse
            alp = jnp.take_along_axis(logits, jnp.maximum(ids_c, 0), axis=-1) - lse[..., None]
            alp = jnp.where(ids_c >= 0, alp, 0.0)
            if topk:
                vals, top = jax.lax.top_k(logits, topk)
                top, tlp = top.astype(jnp.int32), vals - lse[..., None]
            else:
                top, tlp = jnp.zeros((Bp, C, 0), jnp.int32), jnp.zeros((Bp, C, 0), jnp.float32)
            drawn, dlp = [], []
            lsm = jax.nn.log_softmax(tempered(logits, score["temperature"]), axis=-1) if draws else None
            for j in range(draws):  # a [Bp,C,V] noise at a time
                keys = jax.vmap(jax.vmap(lambda w, p: jax.random.fold_in(jax.random.fold_in(_draw_key(w), p), j),
                                         in_axes=(None, 0)))(score["seed"], pos)
                noise = jax.vmap(jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[-1],), jnp.float32)))(keys)
                tok = jnp.where(greedy[:, None], jnp.argmax(logits, -1), jnp.argmax(lsm + noise, -1))
                drawn.append(tok.astype(jnp.int32))
                dlp.append(jnp.take_along_axis(lsm, tok[..., None], axis=-1)[..., 0])
            stack = lambda xs, dt: jnp.stack(xs, -1) if xs else jnp.zeros((Bp, C, 0), dt)  # noqa: E731
            return lp, top, tlp, alp, stack(drawn, jnp.int32), stack(dlp, jnp.float32)

        out = jax.lax.map(one, (split(hidden), split(targets), split(score["ids"]), split(positions)))
        unchunk = lambda x: x.swapaxes(0, 1).reshape(Bp, T, *x.shape[3:])  # noqa: E731
        return tuple(unchunk(x) for x in out)

    def skip(_):
        z = lambda *shape, dt=jnp.float32: jnp.zeros((Bp, T, *shape), dt)  # noqa: E731
        return z(), z(topk, dt=jnp.int32), z(topk), z(A), z(draws, dt=jnp.int32), z(draws)

    return jax.lax.cond(want_logprobs, logprobs, skip, None)


def _draw_key(seed_words: jax.Array) -> jax.Array:
    """A request's key for prompt draws: its seed's key folded with a constant no sample index reaches, so these
    draws never share noise with the decode steps' keys (row_keys: seed, sample, step)."""
    return jax.random.fold_in(jax.random.wrap_key_data(seed_words, impl=PRNG_IMPL), 2**31 - 1)


_prefill_kernel = Kernel(_prefill, static_argnums=(0, 8, 9, 10, 11, 12))


def _prefill_part(graphdef, params, lora, slots, tokens, targets, score: dict, cache: KVCache, start,
                  want_logprobs, topk: int, draws: int, mode: str, chunk: int, cut: bool = True):
    """Positions [start[b], start[b] + chunk) of each row b: tokens / targets [Bp, W] and score["ids"] [Bp, W, A]
    (padded; W >= start + chunk; cut=False: [Bp, chunk], each row's part already), `cache` [L,Bp,S,K,H] holding
    each row's positions before its start (donated) -> (k, v with the part written, then `_prompt_scores`' outputs
    for the part's positions). Writes at slots >= S are dropped (a padded part past the end of a shorter row).

    Two uses: the tails of prompts whose first pages came from the prefix cache (each row its own start), and,
    with `cache` a PagedKV over the pool (`_prefill_pages`), a long prompt's chunk `index` (start = its cached
    positions + index * chunk; a chunk per sampler step, so running decodes keep their pace, and attention scores
    [chunk, S] per head: memory linear in its length)."""
    model = merge(graphdef, params)
    Bp = tokens.shape[0]
    rows = lora_rows(lora, slots, Bp, mode)
    per_row = jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, chunk, axis=0))
    part = per_row if cut else (lambda x, s: x)  # noqa: E731
    pos = start[:, None] + jnp.arange(chunk, dtype=jnp.int32)  # [Bp, chunk]
    hidden, cache = model(part(tokens, start), pos, cache=cache, lora=rows)  # context: each row's slots < start
    score = {**score, "ids": part(score["ids"], start)}
    return (cache.k, cache.v,
            *_prompt_scores(model, rows, hidden, part(targets, start), pos, score, want_logprobs, topk, draws))


_prefill_part_kernel = Kernel(_prefill_part, static_argnums=(0, 10, 11, 12, 13), donate_argnums=(7,))


def _prefill_lora_sh(pl: Placement, lora: tuple) -> tuple:
    """The shardings of a prefill kernel's `lora` (per rank: the table's weights, its scales replicated)."""
    return tuple((pl.table(r, _capacity(w)), pl.rep) for r, (w, _) in zip(_ranks(lora), lora))


def _score_sh(pl: Placement, score: dict) -> dict:
    return {k: pl.rows_sh for k in score}


def prefill_part(pl: Placement, graphdef, params, lora, slots, tokens, targets, score: dict, cache: KVCache, start,
                 want_logprobs, *, topk: int, draws: int, mode: str, chunk: int):
    """`_prefill_part` on placement `pl`, placed as `prefill` places its arguments; `cache` (donated) and the k, v
    that come back like pl.cache, `start` [Bp] (host ints) over rows."""

    def shardings():
        lora_sh = _prefill_lora_sh(pl, lora)
        c = pl.cache
        ins = (pl.params(graphdef, params), lora_sh, tuple(pl.rows_sh for _ in slots), pl.rows_sh, pl.rows_sh,
               _score_sh(pl, score), KVCache(c, c), pl.rows_sh, pl.rep)
        return ins, (c, c) + (pl.rep,) * 6

    f = _prefill_part_kernel.on(pl, (graphdef, _lora_key(lora), tuple(score)), shardings)
    return f(graphdef, params, lora, slots, tokens, targets, score, cache,
             from_host(np.asarray(start, np.int32), pl.rows_sh), want_logprobs, topk, draws, mode, chunk)


def _prefill_pages(graphdef, params, lora, slots, tokens, targets, score: dict, pool: tuple, table, read_table,
                   start, write_from, want_logprobs, topk: int, draws: int, mode: str, chunk: int, *,
                   pool_sh: NamedSharding):
    """`_prefill_part` over the paged pool instead of a cache of its own: row b's positions [start[b], start[b] +
    chunk) (tokens / targets [Bp, chunk] and score["ids"] [Bp, chunk, A]: those positions' only) are written into
    the pages its table [Bp, W] lists (row b on batch shard b // (Bp / n), as decode rows; table entries 0, the
    scratch page, take what no page is listed for), but those before write_from[b] (a cached position recomputed
    only to score the token after it: its page is shared) are not, and its context is the pages read_table [Bp, Wr]
    lists (those of table before start[b], then any: slots from start[b] on are masked), its own keys apart.
    -> (pool k, v with the part written, then `_prompt_scores`' outputs for the part's positions).

    What long prompts' chunks use: their KV lives in pool pages (inside `kv_cache_tokens`) while they are
    prefilled, not in a prompt-sized cache beside the pool, and pages found in the prefix cache are read where they
    are. The rows are chunks of different prompts, each at its own start (the scheduler batches them)."""
    cache = PagedKV(*pool, table, PoolSharding(pool_sh) if pool_sh.mesh.size > 1 else None, write_from, read_table)
    k, v, *scores = _prefill_part(graphdef, params, lora, slots, tokens, targets, score, cache, start, want_logprobs,
                                  topk, draws, mode, chunk, cut=False)
    return (k, v), *scores


_prefill_pages_kernel = Kernel(_prefill_pages, static_argnums=(0, 13, 14, 15, 16), donate_argnums=(7,))


def prefill_pages(pl: Placement, graphdef, params, lora, slots, tokens, targets, score: dict, pool: tuple, table,
                  start, want_logprobs, *, topk: int, draws: int, mode: str, chunk: int, write_from=None,
                  read_table=None):
    """`_prefill_pages` on placement `pl`, placed as `prefill_part` places its arguments (tokens, targets [Bp,
    chunk]); the pool (k, v; donated) like pl.pool, and back the same; table [Bp, W], read_table [Bp, Wr] (default
    table), start and write_from [Bp] (host ints; write_from default start: every position of the chunk written)
    over rows."""

    def shardings():
        lora_sh = _prefill_lora_sh(pl, lora)
        c = pl.pool
        ins = (pl.params(graphdef, params), lora_sh, tuple(pl.rows_sh for _ in slots), pl.rows_sh, pl.rows_sh,
               _score_sh(pl, score), (c, c), pl.rows_sh, pl.rows_sh, pl.rows_sh, pl.rows_sh, pl.rep)
        return ins, ((c, c),) + (pl.rep,) * 6

    f = _prefill_pages_kernel.on(pl, (graphdef, _lora_key(lora), tuple(score)), shardings, pool_sh=pl.pool)
    rows = lambda x: from_host(np.asarray(x, np.int32), pl.rows_sh)  # noqa: E731
    return f(graphdef, params, lora, slots, tokens, targets, score, tuple(pool), rows(table),
             rows(table if read_table is None else read_table), rows(start),
             rows(start if write_from is None else write_from), want_logprobs, topk, draws, mode, chunk)


def prefill(pl: Placement, graphdef, params, lora, slots, tokens, targets, score: dict, want_logprobs, *, topk: int,
            draws: int, cache_dtype, mode: str = "gather", attention: str = "einsum"):
    """`_prefill` on placement `pl`: lora per rank (table weights, scale [S,P]); slots per rank [Bp]; tokens, targets
    [Bp,T] and score's per-row arrays (Bp a multiple of pl.shards) over rows, want_logprobs replicated. The fresh
    cache comes out placed like the sampler's cache (rows over the batch axes); the rest replicated."""

    def shardings():
        lora_sh = _prefill_lora_sh(pl, lora)
        ins = (pl.params(graphdef, params), lora_sh, tuple(pl.rows_sh for _ in slots), pl.rows_sh, pl.rows_sh,
               _score_sh(pl, score), pl.rep)
        return ins, (pl.cache, pl.cache) + (pl.rep,) * 6

    f = _prefill_kernel.on(pl, (graphdef, _lora_key(lora), tuple(score)), shardings)
    return f(graphdef, params, lora, slots, tokens, targets, score, want_logprobs, topk, draws, cache_dtype, mode,
             attention)


def _insert_pages(pool: tuple, k_new, v_new, src, page_of, dest, *, mesh: Mesh, spec: P, new_spec: P) -> tuple:
    """Copy pages of prefilled rows into the paged pool (k, v) [L,n,Pn,page,K,H]: on shard s, page dest[s, m] gets
    positions [j*page, (j+1)*page) of prefill row src[s, m], j = page_of[s, m].

    src / page_of / dest [n, M] (split over the shards); dest entries == Pn are padding and are dropped. One prefill
    row's pages may go to several places (the samples of a request each get their own copy of its partly filled
    last prompt page; its full pages are copied once per shard and shared). Each device writes only its own pages
    (shard_map): the prefill rows k_new / v_new [L,Bp,T,K,H] are gathered whole onto every shard (they are few),
    the pool never moves.
    """
    batch = spec[1] if len(spec) > 1 else None  # the batch mesh axes of the pool's shard dim (None: one shard)
    idx_spec = P(batch)

    def local(pk, pv, kn, vn, src, page_of, dest):
        page, T = pk.shape[3], kn.shape[2]
        pad = -T % page

        def blocks(x):  # [L,Bp,T,K,H] -> the listed pages [L,M,page,K,H]
            x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))
            x = x.reshape(x.shape[0], x.shape[1], -1, page, *x.shape[3:])
            return x[:, src[0], page_of[0]]

        k = pk.at[:, 0, dest[0]].set(blocks(kn).astype(pk.dtype), mode="drop")
        v = pv.at[:, 0, dest[0]].set(blocks(vn).astype(pv.dtype), mode="drop")
        return k, v

    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, new_spec, new_spec, idx_spec, idx_spec, idx_spec),
                         out_specs=(spec, spec))(*pool, k_new, v_new, src, page_of, dest)


_insert_kernel = Kernel(_insert_pages, donate_argnums=(0,))


def insert_pages(pl: Placement, pool: tuple, k_new, v_new, src, page_of, dest) -> tuple:
    """`_insert_pages` on placement `pl`: the pool (k, v; donated) placed like pl.pool, k_new / v_new like pl.cache,
    src / page_of / dest [n, M] over the shards (pl.shard_sh)."""
    c, d, i = pl.pool, pl.cache, pl.shard_sh
    new_spec = P(*(None if j == 1 else a for j, a in enumerate(d.spec)))  # prefill rows whole on every shard
    f = _insert_kernel.on(pl, (), lambda: (((c, c), d, d, i, i, i), (c, c)), mesh=pl.mesh, spec=c.spec,
                          new_spec=new_spec)
    return f(tuple(pool), k_new, v_new, src, page_of, dest)


def _cached_rows(pool: tuple, shard, pages, lengths, slots: int) -> tuple:
    """A prefill's cache (k, v) [L,Bp,slots,K,H] from the prefix cache: row b holds the pool's pages `pages[b]` [m]
    (a cached prompt prefix, in position order; page j of batch shard `shard[b, j]`) at slots [0, lengths[b]);
    every other slot is zero, as a fresh prefill's cache."""

    def one(p):
        x = p[:, shard, pages]  # [L,Bp,m,page,K,H]
        x = x.reshape(*x.shape[:2], -1, *x.shape[4:])[:, :, :slots]  # [L,Bp,min(m*page, slots),K,H]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, slots - x.shape[2]), (0, 0), (0, 0)))
        keep = jnp.arange(slots)[None, :] < lengths[:, None]  # [Bp,slots]
        return jnp.where(keep[None, :, :, None, None], x, jnp.zeros((), p.dtype))

    return one(pool[0]), one(pool[1])


_cached_kernel = Kernel(_cached_rows, static_argnums=(4,))


def cached_rows(pl: Placement, pool: tuple, shard, pages, lengths, *, slots: int) -> KVCache:
    """`_cached_rows` on placement `pl`: shard and pages [Bp, m], lengths [Bp] (host ints; Bp a multiple of
    pl.shards, m any: pad with page 0 and a shorter length); the pool as pl.pool places it; the cache comes out
    like pl.cache."""
    c = pl.pool
    f = _cached_kernel.on(pl, (), lambda: (((c, c), pl.rep, pl.rep, pl.rep), (pl.cache, pl.cache)))
    host = lambda x: from_host(np.asarray(x, np.int32), pl.rep)  # noqa: E731
    k, v = f(tuple(pool), host(shard), host(pages), host(lengths), slots)
    return KVCache(k, v)


def _put_adapter(weights: dict, scale: jax.Array, slot: jax.Array, values: dict, scales: jax.Array):
    """A table's slot `slot` <- one adapter (every projection, fp32, cast to the table's dtype) and its scales [P]."""
    one = jnp.reshape(slot, (1,))
    dt = lora_math.tree_dtype(weights)
    weights = lora_math.set_slots(weights, one, lora_math.slots_back(jax.tree.map(lambda x: x[None].astype(dt),
                                                                                  values)))
    return weights, scale.at[slot].set(scales)


_put_kernel = Kernel(_put_adapter, donate_argnums=(0, 1))


def put_adapter(pl: Placement, weights: dict, scale: jax.Array, slot: jax.Array, values: dict, scales: jax.Array):
    """`_put_adapter` on placement `pl`: the table (donated) stays where pl.table puts it; values must be placed
    by pl.adapter(rank); slot, scale and scales replicated."""
    rank, capacity = _ranks(((weights, None),))[0], _capacity(weights)

    def shardings():
        t = pl.table(rank, capacity)
        return (t, pl.rep, pl.rep, pl.adapter(rank), pl.rep), (t, pl.rep)

    return _put_kernel.on(pl, (rank, capacity), shardings)(weights, scale, slot, values, scales)


def _ranks(lora: tuple) -> tuple[int, ...]:
    """The rank of each table in `lora` (from q's `a` [L,S,in,R]; every table holds every projection)."""
    return tuple(int(t[0]["q"]["a"].shape[-1]) for t in lora)


def _capacity(weights: dict) -> int:
    return int(weights["q"]["a"].shape[lora_math.slot_axis("q")])


def _lora_key(lora: tuple) -> tuple:
    return tuple(zip(_ranks(lora), (_capacity(t[0]) for t in lora)))


# ------------------------------------------------------------------------------------------------- decode

# Row state, all [B] (stop_ids [B,NS], seed [B,2]): host-owned numpy, placed over rows each call.
DYNAMIC = ("tok", "pos", "n_gen", "live")  # returned updated by `decode`
STATIC = ("max_tokens", "temperature", "top_k", "top_p", "seed", "sample", "stop_ids", "topk_n")


def _decode(graphdef, params, lora, slots, pool: tuple, table, dyn: dict, par: dict, run_mask, until_finish,
            n_steps: int, pages: int | None, rows: int | None, unroll: bool, topk: int, attention: str, *,
            shards: int, pool_sh: NamedSharding):
    """Up to n_steps decode steps for the rows in run_mask (every row of one set of base weights, each with its own
    adapter), in one device loop that ends early when no row of run_mask is live any more or, with `until_finish`
    (a bool scalar: requests wait for rows), right after the first step in which a row finished. `lora` per rank:
    (table weights, scale, active [Sa] table slots the rows use); `slots` per rank:
    each row's index into `active`. The active adapters are gathered once per call, then every step applies them
    to every row masked to the row's own (a decode row is one token: reading each adapter in use once per step
    is cheaper than a copy per row, and a step never reads an adapter no row uses).

    pool (k, v) [L,n,Pn,page,K,H] and table [B,W]: the paged KV cache (models.decoder.PagedKV). A live row feeds
    `tok` at `pos` (written into its page for that position), samples its next token with key (seed, sample,
    n_gen), and finishes when that token is one of its stop ids or n_gen reaches max_tokens; rows that are not
    live write into page 0, which no row reads. Returns (pool, dyn, tokens [n,B], logprobs [n,B], valid [n,B],
    steps run, top-k ids [n,B,topk], top-k logprobs [n,B,topk]); valid marks the outputs that belong to a live row
    (none after the loop ended). The top-k (SDK `topk_sample_logprobs`, up to the static width `topk`) are of the
    distribution each token's logprob reports (logits / T, before any top_k / top_p truncation); they are computed
    only in steps where a live row asked (`topk_n` > 0), zeros otherwise.

    pages: when every live row's positions in this call stay below pages * page, attention reads only the first
    `pages` pages of each row's table (None: all W). No copy of the cache is made: each step reads the rows' pages
    from the pool and writes one slot per row back into it.

    rows: when every row of run_mask is among the first `rows` rows of its shard (`shards`: the batch mesh axes'
    size, see the module docstring), only those rows are decoded; a lone request then costs one row per shard of
    compute instead of max_batch / shards. Outputs are scattered back to [n, B] (rows not decoded: not valid).

    pool_sh: the pool's sharding, imposed on it on both sides of every step's decoder call. Where the pool keeps kv
    heads whole but the k / v projections are split over tensor mid-head (2 kv heads on tensor=4), XLA otherwise
    carried the loop's cache split like them and gathered the whole cache back per step and per call (seen in the
    compiled HLO; dropping either pin brought that back); pinned, only each step's new [R,1,K,H] keys and values
    move.
    """
    model = merge(graphdef, params)
    B = table.shape[0]
    r = rows or B // shards  # rows decoded per shard
    take = lambda x, axis=0: _shard_rows(x, shards, r, axis)  # noqa: E731
    compact = tuple((take_slots(w, active), jnp.take(scale, active, axis=0)) for w, scale, active in lora)
    adapters = lora_rows(compact, tuple(take(s) for s in slots), shards * r, "dense")
    d0, p, m = (jax.tree.map(take, t) for t in (dyn, par, run_mask))
    tab = take(table)[:, :pages]  # [R, pages]
    pin = lambda kv: tuple(jax.lax.with_sharding_constraint(x, pool_sh) for x in kv)  # noqa: E731

    def step(kv, d):
        kv = pin(kv)
        live = d["live"] & m
        # not live: page 0, read by no row; the pool's sharding for the paged kernel's shard_map (where it has one)
        cache = PagedKV(*kv, jnp.where(live[:, None], tab, 0), PoolSharding(pool_sh) if pool_sh.mesh.size > 1 else None)
        hidden, cache = model(d["tok"][:, None], jnp.where(live, d["pos"], 0)[:, None], cache=cache, unroll=unroll,
                              lora=adapters, attention=attention)
        kv = pin((cache.k, cache.v))
        logits = model.logits(hidden, adapters)[:, 0]  # [R,V]
        keys = row_keys(p["seed"], p["sample"], d["n_gen"])
        tok, lp = select_tokens(logits, p["temperature"], p["top_k"], p["top_p"], keys)
        tk_ids, tk_lps = _top_logprobs(logits, p["temperature"], live & (p["topk_n"] > 0), topk)
        n_gen = d["n_gen"] + live.astype(jnp.int32)
        hit_stop = jnp.any(tok[:, None] == p["stop_ids"], axis=-1)
        finished = live & (hit_stop | (n_gen >= p["max_tokens"]))
        new = dict(tok=jnp.where(live, tok, d["tok"]), pos=jnp.where(live, d["pos"] + 1, d["pos"]),
                   n_gen=n_gen, live=d["live"] & ~finished)
        return kv, new, (tok, lp, live, tk_ids, tk_lps), jnp.any(finished)

    R = d0["tok"].shape[0]
    outs = (jnp.zeros((n_steps, R), jnp.int32), jnp.zeros((n_steps, R), jnp.float32), jnp.zeros((n_steps, R), bool),
            jnp.zeros((n_steps, R, topk), jnp.int32), jnp.zeros((n_steps, R, topk), jnp.float32))

    def more(carry):
        i, _, d, _, done = carry
        return (i < n_steps) & jnp.any(d["live"] & m) & ~done

    def body(carry):
        i, kv, d, outs, _ = carry
        kv, d, out, finished = step(kv, d)
        outs = tuple(jax.lax.dynamic_update_index_in_dim(o, x.astype(o.dtype), i, 0) for o, x in zip(outs, out))
        return i + 1, kv, d, outs, finished & until_finish

    # A while loop, not a scan: a call whose rows all finish early, or that frees a row another request waits for,
    # returns then instead of running out its n_steps (so n_steps can be large without making a short sample wait).
    n_run, pool, d1, (toks, lps, valid, tk_ids, tk_lps), _ = jax.lax.while_loop(
        more, body, (jnp.int32(0), tuple(pool), d0, outs, jnp.bool_(False)))
    dyn = jax.tree.map(lambda full, part: _set_shard_rows(full, part, shards, r), dyn, d1)
    widen = lambda x: _set_shard_rows(jnp.zeros((n_steps, B, *x.shape[2:]), x.dtype), x, shards, r, 1)  # noqa: E731
    return pool, dyn, widen(toks), widen(lps), widen(valid), n_run, widen(tk_ids), widen(tk_lps)


def _top_logprobs(logits: jax.Array, temperature: jax.Array, want: jax.Array, k: int):
    """logits [R,V] fp32 -> the k most likely tokens of the distribution each row's sampled logprob is reported from
    (log_softmax of logits / T, untruncated; untempered for greedy rows, as select_tokens reports) and their
    logprobs, [R,k] each; zeros unless a row of `want` [R] asked (a runtime switch: the [R,V] top-k is not paid for
    by steps that need none)."""
    R = logits.shape[0]
    if k == 0:
        return jnp.zeros((R, 0), jnp.int32), jnp.zeros((R, 0), jnp.float32)

    def top(_):
        vals, ids = jax.lax.top_k(jax.nn.log_softmax(tempered(logits, temperature), axis=-1), k)
        return ids.astype(jnp.int32), vals

    return jax.lax.cond(jnp.any(want), top, lambda _: (jnp.zeros((R, k), jnp.int32), jnp.zeros((R, k), jnp.float32)),
                        None)


_decode_kernel = Kernel(_decode, static_argnums=(0, 10, 11, 12, 13, 14, 15), donate_argnums=(4,))


def decode(pl: Placement, graphdef, params, lora, slots, pool: tuple, table, dyn: dict, par: dict, run_mask, *,
           n_steps: int, pages: int | None = None, rows: int | None = None, unroll: bool = False,
           until_finish: bool = False, topk: int = 0, attention: str = "einsum"):
    """`_decode` on placement `pl`: per-row inputs (slots, table, dyn, par, run_mask) placed over rows, lora's scale
    and active replicated, the pool (k, v; donated) like pl.pool. The pool comes back placed as it went in; row
    state, tokens, logprobs, valid and the number of steps run come back replicated (the host reads them)."""

    def shardings():
        lora_sh = tuple((pl.table(r, _capacity(t[0])), pl.rep, pl.rep) for r, t in zip(_ranks(lora), lora))
        c, rs = pl.pool, pl.rows_sh
        ins = (pl.params(graphdef, params), lora_sh, tuple(rs for _ in slots), (c, c), rs,
               {k: rs for k in dyn}, {k: rs for k in par}, rs, pl.rep)
        return ins, ((c, c), {k: pl.rep for k in dyn}, pl.rep, pl.rep, pl.rep, pl.rep, pl.rep, pl.rep)

    f = _decode_kernel.on(pl, (graphdef, _lora_key(lora), tuple(dyn), tuple(par)), shardings,
                          shards=pl.shards, pool_sh=pl.pool)
    until = from_host(np.asarray(bool(until_finish)), pl.rep)
    return f(graphdef, params, lora, slots, tuple(pool), table, dyn, par, run_mask, until, n_steps, pages, rows,
             unroll, topk, attention)


# Compiled-program counts under the public names (tests: new values, weights or adapters never recompile).
prefill._cache_size = _prefill_kernel._cache_size
prefill_part._cache_size = _prefill_part_kernel._cache_size
prefill_pages._cache_size = _prefill_pages_kernel._cache_size
insert_pages._cache_size = _insert_kernel._cache_size
decode._cache_size = _decode_kernel._cache_size
put_adapter._cache_size = _put_kernel._cache_size
