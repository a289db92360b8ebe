"""Jitted sampling kernels: prefill, decode (several steps per call), cache row insertion, token choice.

Shapes are fixed per Sampler (rows B, cache slots S = max_seq_len + 1) or bucketed (prefill rows Bp, prefill
length T), and every per-request knob (temperature, top_k, top_p, seed, max_tokens, stop ids) is an array, so
new values never recompile. Weights enter as (graphdef static, params) arguments; LoRA adapters as per-rank tables
(`lora`: a tuple of (weights {proj: {"a": [L,S,in,R], "b": ...}}, scale [S,P]) per rank, models.lora) and, per
row, its table slot per rank (`slots`: a tuple of [B] int32; 0 is the null adapter). Rows of different adapters
(and rows of the bare base model) therefore share one prefill or decode call.

Cache layout follows the Decoder contract: KVCache k/v [L,B,S,K,H], slot index == absolute position. The
last slot (S - 1) is a scratch slot: rows that are idle, finished or in another snapshot's group write there,
and no real query ever reaches it (positions stay < max_seq_len = S - 1). A decode call may instead work on a
shorter view of the cache (slots [0, view) plus its own scratch slot), see `decode`.

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

from functools import partial

import jax
import jax.numpy as jnp

from tinker_jax.models.decoder import KVCache, merge
from tinker_jax.models.lora import LoraRows, take_slots

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


def select_tokens(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [B,V] fp32, per-row temperature/top_k/top_p [B], keys [B] -> (tokens [B] int32, logprobs [B]).

    T = 0 is argmax (first index on ties, as torch). Otherwise Gumbel-max over the truncated logits / T; the
    noise comes from the row's own key only, so a row's draw does not depend on its batch.
    """
    V = logits.shape[-1]
    greedy = temperature <= 0
    t = jnp.where(greedy, 1.0, temperature)
    scaled = logits / t[:, None]
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


# ------------------------------------------------------------------------------------------------ prefill


def _chunk(T: int, target: int = 256) -> int:
    """Largest divisor of T that is <= target: prompt logprobs are computed T-chunk by T-chunk so the
    [Bp, T, V] logits never exist at once."""
    return max(c for c in range(1, min(T, target) + 1) if T % c == 0)


def lora_rows(lora: tuple, slots: tuple, rows: int, mode: str) -> tuple[LoraRows, ...]:
    """The decoder's per-rank LoraRows for rows [0, rows) with table slots `slots` (each [>= rows])."""
    return tuple(LoraRows(w, scale, s[:rows], 0, rows, mode) for (w, scale), s in zip(lora, slots))


@partial(jax.jit, static_argnums=(0,), static_argnames=("topk", "cache_dtype", "mode"))
def prefill(graphdef, params, lora, slots, tokens, targets, want_logprobs, *, topk: int, cache_dtype,
            mode: str = "gather"):
    """Run prompt tokens [Bp,T] (prompt[:-1], right-padded) at positions 0..T-1 into a fresh [Bp,T] cache.

    targets [Bp,T] = prompt[1:] padded; want_logprobs: bool scalar (a runtime switch, not a recompile).
    Returns (k, v [L,Bp,T,K,H], target_logprobs [Bp,T], topk_ids [Bp,T,topk], topk_logprobs [Bp,T,topk]).
    Padding writes garbage into slots >= its row's length; the decode step that later feeds the last prompt
    token overwrites each such slot before any query can attend to it.
    """
    model = merge(graphdef, params)
    Bp, T = tokens.shape
    rows = lora_rows(lora, slots, Bp, mode)
    cache = KVCache.init(model.cfg, Bp, T, cache_dtype)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (Bp, T))
    hidden, cache = model(tokens, positions, cache=cache, lora=rows)  # [Bp,T,D]

    def logprobs(_):
        C = _chunk(T)
        hc = hidden.reshape(Bp, T // C, C, -1).swapaxes(0, 1)  # [T/C, Bp, C, D]
        tc = targets.reshape(Bp, T // C, C).swapaxes(0, 1)

        def one(args):
            h, tgt = args
            logits = model.logits(h, rows)  # [Bp,C,V] fp32
            lse = jax.nn.logsumexp(logits, axis=-1)
            lp = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0] - lse
            if topk:
                vals, ids = jax.lax.top_k(logits, topk)
                return lp, ids.astype(jnp.int32), vals - lse[..., None]
            return lp, jnp.zeros((Bp, C, 0), jnp.int32), jnp.zeros((Bp, C, 0), jnp.float32)

        lp, ids, tlp = jax.lax.map(one, (hc, tc))
        unchunk = lambda x: x.swapaxes(0, 1).reshape(Bp, T, *x.shape[3:])
        return unchunk(lp), unchunk(ids), unchunk(tlp)

    def skip(_):
        return (jnp.zeros((Bp, T), jnp.float32), jnp.zeros((Bp, T, topk), jnp.int32),
                jnp.zeros((Bp, T, topk), jnp.float32))

    lp, ids, tlp = jax.lax.cond(want_logprobs, logprobs, skip, None)
    return cache.k, cache.v, lp, ids, tlp


@partial(jax.jit, donate_argnums=(0,))
def insert_rows(cache: KVCache, k_new, v_new, dest, src) -> KVCache:
    """Copy prefilled rows into the batch cache: row dest[m] gets slots [0, T) of prefill row src[m].

    dest/src [M] (M = the cache's row count); dest entries == B are padding and are dropped. One prefill
    row may go to several dest rows (num_samples shares one prefill).
    """
    T = k_new.shape[2]
    k = cache.k.at[:, dest, :T].set(k_new[:, src].astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, dest, :T].set(v_new[:, src].astype(cache.v.dtype), mode="drop")
    return KVCache(k, v)


# ------------------------------------------------------------------------------------------------- decode

# Row state, all [B] (stop_ids [B,NS], seed [B,2]): host-owned numpy, passed in each call.
DYNAMIC = ("tok", "pos", "n_gen", "live")  # returned updated by `decode`
STATIC = ("max_tokens", "temperature", "top_k", "top_p", "seed", "sample", "stop_ids")


@partial(jax.jit, static_argnums=(0,), static_argnames=("n_steps", "view", "rows", "unroll"),
         donate_argnums=(4,))
def decode(graphdef, params, lora, slots, cache: KVCache, dyn: dict, par: dict, run_mask, *, n_steps: int,
           view: int | None = None, rows: int | None = None, unroll: bool = False):
    """n_steps decode steps for the rows in run_mask (every row of one set of base weights, each with its own
    adapter). `lora` per rank: (table weights, scale, active [Sa] table slots the rows use); `slots` per rank:
    each row's index into `active`. The active adapters are gathered once per call, then every step applies them
    to every row masked to the row's own (a decode row is one token: reading each adapter in use once per step
    is cheaper than a copy per row, and a step never reads an adapter no row uses).

    A live row feeds `tok` at `pos`, samples its next token with key (seed, sample, n_gen), and finishes when
    that token is one of its stop ids or n_gen reaches max_tokens. Returns (cache, dyn, tokens [n,B],
    logprobs [n,B], valid [n,B]); valid marks the outputs that belong to a live row.

    view: when every live row's positions in this call stay below `view`, the steps run on a copy of slots
    [0, view) plus a fresh scratch slot, written back at the end. Attention then reads view + 1 slots per step
    instead of S (the Decoder masks but still reads the whole cache): one copy per call instead of a full-cache
    read per step. None runs on the whole cache (its last slot is the scratch slot).

    rows: when every row of run_mask is below `rows`, only cache rows [0, rows) are decoded (outputs are
    [n, rows]); a lone request then costs one row of compute instead of max_batch.
    """
    model = merge(graphdef, params)
    full_dyn, R = dyn, rows or cache.k.shape[1]
    compact = tuple((take_slots(w, active), jnp.take(scale, active, axis=0)) for w, scale, active in lora)
    adapters = lora_rows(compact, slots, R, "dense")
    dyn, par, run_mask = (jax.tree.map(lambda x: x[:R], t) for t in (dyn, par, run_mask))
    if view is None:
        work = KVCache(cache.k[:, :R], cache.v[:, :R])
    else:
        pad = lambda x: jnp.concatenate([x[:, :R, :view], jnp.zeros_like(x[:, :R, :1])], axis=2)
        work = KVCache(pad(cache.k), pad(cache.v))  # [L,R,view+1,K,H]
    scratch = work.k.shape[2] - 1

    def step(carry, _):
        kv, d = carry
        live = d["live"] & run_mask
        pos = jnp.where(live, d["pos"], scratch)
        hidden, kv = model(d["tok"][:, None], pos[:, None], cache=kv, unroll=unroll, lora=adapters)
        logits = model.logits(hidden, adapters)[:, 0]  # [B,V]
        keys = row_keys(par["seed"], par["sample"], d["n_gen"])
        tok, lp = select_tokens(logits, par["temperature"], par["top_k"], par["top_p"], keys)
        n_gen = d["n_gen"] + live.astype(jnp.int32)
        hit_stop = jnp.any(tok[:, None] == par["stop_ids"], axis=-1)
        finished = live & (hit_stop | (n_gen >= par["max_tokens"]))
        new = dict(tok=jnp.where(live, tok, d["tok"]), pos=jnp.where(live, d["pos"] + 1, d["pos"]),
                   n_gen=n_gen, live=d["live"] & ~finished)
        return (kv, new), (tok, lp, live)

    (work, dyn), (toks, lps, valid) = jax.lax.scan(step, (work, dyn), None, length=n_steps)
    if view is not None or R < cache.k.shape[1]:
        n = view or cache.k.shape[2]
        work = KVCache(cache.k.at[:, :R, :n].set(work.k[:, :, :n]), cache.v.at[:, :R, :n].set(work.v[:, :, :n]))
    dyn = jax.tree.map(lambda full, part: full.at[:R].set(part), full_dyn, dyn)
    return work, dyn, toks, lps, valid
