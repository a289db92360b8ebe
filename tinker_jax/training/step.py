"""The training step: pure jitted functions of (base weights, adapters or trainable weights, micro-batch).

LoRA runs of one base model share the base weights and train in *pools*: per rank, every adapter weight stacked
over slots ([L, S, in, R]; models.lora), with the gradient accumulator and Adam moments stacked the same way. A
micro-batch (training.batching.MicroBatch) mixes rows of any runs: each rank segment gathers the slots it uses
into a compact [L, Sa, ...] copy, the loss is differentiated with respect to that copy only, and its gradient is
added into the pool's accumulator at those slots (in place: the accumulator is donated). One run's rows depend
only on its own adapter (rows are independent sequences), so each slot receives exactly its run's gradient.

Losses are computed per row (vmapped over rows, each row with its own loss function and config), so one batch
may mix cross_entropy, importance_sampling, ppo, ... and report each request's own loss and metrics.
Full fine-tuning runs keep their own fp32 copy of every weight and step alone (`full_*`).

Everything that varies per call (batch contents, loss config values, Adam hyperparameters, slot indices) is an
array argument; only the layout (rank segments, loss names, K) and bucketed shapes are static.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from tinker_jax.models.decoder import Decoder, merge
from tinker_jax.models.lora import LoraRows, add_slots, set_slots, slots_back, slots_first, take_slots
from tinker_jax.training import optim
from tinker_jax.training.batching import Layout
from tinker_jax.training.losses import get_loss

LOGIT_CHUNK = 2048  # tokens unembedded at a time: only [chunk, V] fp32 logits exist at once
ROUTER_STATS = "router_stats"  # key of a MoE model's per-row router statistics [B,2,E] among the row metrics


# ------------------------------------------------------------------------------------------- forward


def _lora_rows(layout: Layout, weights: tuple, scales: tuple, batch: dict) -> tuple[LoraRows, ...]:
    """One LoraRows per rank segment: the compact weights [L,Sa,...], their scales [Sa,P], each row's entry."""
    out = []
    for (rank, start, size, mode, _), w, scale, seg in zip(layout.segments, weights, scales, batch["lora"]):
        out.append(LoraRows(w, scale, seg["row_index"], start, size, mode))
    return tuple(out)


def _chunked_logprobs(model: Decoder, h: jax.Array, tgt: jax.Array, c: LoraRows | None) -> jax.Array:
    """Target logprobs of rows h [n,T,D] (targets [n,T] or [n,T,K]), unembedded LOGIT_CHUNK tokens at a time under
    jax.checkpoint, so neither pass holds the [n,T,V] logits (10 GB in fp32 for 16k tokens of a 152k vocabulary).
    A chunk is whole rows, or a piece of one row, so its unembedding adapter rows are known: `c`'s slots."""
    n, T, D = h.shape
    C = min(LOGIT_CHUNK, n * T)  # powers of two: C divides n * T
    rpc, tpc = (C // T, T) if C >= T else (1, C)  # rows per chunk, tokens per row per chunk
    nr, nt = n // rpc, T // tpc
    chunked = lambda x: x.reshape(nr, rpc, nt, tpc, *x.shape[2:]).swapaxes(1, 2).reshape(  # noqa: E731
        nr * nt, rpc, tpc, *x.shape[2:])
    slots = jnp.zeros((nr * nt, rpc), jnp.int32) if c is None else jnp.repeat(
        c.slots.reshape(nr, 1, rpc), nt, axis=1).reshape(nr * nt, rpc)

    @jax.checkpoint
    def chunk(args):
        hc, t, s = args  # [rpc,tpc,D], [rpc,tpc(,K)], [rpc]
        lora = () if c is None else (LoraRows({"unembed": c.weights["unembed"]}, c.scale, s, 0, rpc, c.mode),)
        logits = model.logits(hc, lora)  # [rpc,tpc,V] fp32
        logz = jax.nn.logsumexp(logits, axis=-1)
        if t.ndim == 2:
            return jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - logz
        return jnp.take_along_axis(logits, t, axis=-1) - logz[..., None]

    lp = jax.lax.map(chunk, (chunked(h), chunked(tgt), slots))  # [nr*nt, rpc, tpc(,K)]
    lp = lp.reshape(nr, nt, rpc, tpc, *tgt.shape[2:]).swapaxes(1, 2)
    return lp.reshape(tgt.shape)


def target_logprobs(model: Decoder, batch: dict, lora: tuple[LoraRows, ...] = (), remat: bool = False,
                    attention: str = "einsum", router: list | None = None) -> jax.Array:
    """Log-probabilities of the target tokens: [B,T] (or [B,T,K] for top-K targets), fp32. `router` (a list):
    a MoE model's per-row router statistics [B,2,E] are appended to it (Decoder.__call__'s router_stats)."""
    moe = router is not None and model.cfg.is_moe
    hidden, stats = model(batch["tokens"], batch["positions"], segment_ids=batch["mask"].astype(jnp.int32),
                          remat=remat, attention=attention, lora=lora, router_stats=moe)
    if moe:
        router.append(stats)
    tgt = batch["targets"]
    if not lora:
        return _chunked_logprobs(model, hidden, tgt, None)
    parts = [_chunked_logprobs(model, hidden[c.start:c.start + c.size], tgt[c.start:c.start + c.size], c)
             for c in lora]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def row_losses(lp: jax.Array, batch: dict, losses: tuple[str, ...]):
    """Per-row loss sums [B] and per-row metrics {loss name: {metric: [B]}}: row b takes loss `losses[loss_id[b]]`
    with its own config values (each Tinker loss is a sum over tokens, so a batch's loss is the sum of its rows').
    Metrics are keyed by their loss, so a request reports only its own loss's metrics (0 on other losses' rows)."""
    total = jnp.zeros(lp.shape[0], jnp.float32)
    metrics: dict[str, dict[str, jax.Array]] = {}
    for i, name in enumerate(losses):
        spec = get_loss(name)
        mask = batch["mask"] * (batch["loss_id"] == i)[:, None]  # other losses' rows: all padding here
        keys = [k for k in (*spec.required_inputs, *spec.optional_inputs) if k in batch["inputs"]]
        x = {k: batch["inputs"][k] for k in keys}
        cfg = {k: batch["loss_config"][k] for k in spec.config_defaults}

        def one(lp1, x1, m1, c1, fn=spec.fn):
            return fn(lp1[None], {k: v[None] for k, v in x1.items()}, m1[None], c1)

        loss, met = jax.vmap(one)(lp, x, mask, cfg)
        total = total + loss
        if met:
            metrics[name] = dict(met)
    return total, metrics


# ------------------------------------------------------------------------------------------- LoRA pools


def _compact(layout: Layout, pools: tuple, scales: tuple, batch: dict):
    weights = tuple(take_slots(p, seg["active"]) for p, seg in zip(pools, batch["lora"]))
    scale = tuple(jnp.take(s, seg["active"], axis=0) for s, seg in zip(scales, batch["lora"]))
    return weights, scale


def _with_router(metrics: dict, router: list) -> dict:
    """A MoE model's per-row router statistics ride along with the loss metrics, under ROUTER_STATS."""
    return {**metrics, ROUTER_STATS: router[0]} if router else metrics


def _lora_loss(weights, scales, base, graphdef, batch, layout, remat, attention):
    lora = _lora_rows(layout, weights, scales, batch)
    router: list = []
    lp = target_logprobs(merge(graphdef, base), batch, lora, remat, attention, router)
    loss, metrics = row_losses(lp, batch, layout.losses)
    return jnp.sum(loss), (loss, _with_router(metrics, router), lp)


@partial(jax.jit, static_argnames=("graphdef", "layout", "remat", "attention"), donate_argnames=("grads",))
def lora_forward_backward(base, pools: tuple, grads: tuple, scales: tuple, batch: dict, *, graphdef,
                          layout: Layout, remat: bool = False, attention: str = "einsum"):
    """-> (grads with this batch's gradient added at the slots it used, row losses [B], row metrics, lp).
    pools / grads / scales: one entry per rank segment of `layout` (the pools of those ranks)."""
    weights, scale = _compact(layout, pools, scales, batch)
    (_, (loss, metrics, lp)), g = jax.value_and_grad(_lora_loss, has_aux=True)(
        weights, scale, base, graphdef, batch, layout, remat, attention)
    grads = tuple(add_slots(acc, seg["active"], gc) for acc, seg, gc in zip(grads, batch["lora"], g))
    return grads, loss, metrics, lp


@partial(jax.jit, static_argnames=("graphdef", "layout", "attention"))
def lora_forward(base, pools: tuple, scales: tuple, batch: dict, *, graphdef, layout: Layout,
                 attention: str = "einsum"):
    """-> (row losses [B], row metrics, lp) with no gradient."""
    weights, scale = _compact(layout, pools, scales, batch)
    _, (loss, metrics, lp) = _lora_loss(weights, scale, base, graphdef, batch, layout, False, attention)
    return loss, metrics, lp


def _slots_step(update, pool: dict, grads: dict, mu: dict, nu: dict, count: jax.Array, slots: jax.Array,
                hps: jax.Array, valid: jax.Array):
    """`update`(p, g, m, v, count, hp) -> (p, m, v, count, grad_norm), vmapped over `slots` [k] of one pool (hps
    [k, ...], valid [k]: False for padding entries, which must name the null slot 0); every other slot is
    untouched. Zeroes the slots' gradient accumulators. -> (pool, grads, mu, nu, count, grad_norm [k])."""
    sel = lambda t: slots_first(take_slots(t, slots))  # noqa: E731 - [k, L, ...]
    p, g, m, v = sel(pool), sel(grads), sel(mu), sel(nu)
    c = count[slots]
    p2, m2, v2, c2, gnorm = jax.vmap(update)(p, g, m, v, c, hps)
    # A slot whose gradient is not finite keeps its weights and moments (its gradient is dropped below): one NaN
    # would otherwise spread to every weight of the run for good. The worker reports it (finite_step).
    ok = valid & jnp.isfinite(gnorm)
    keep = lambda new, old: jax.tree.map(  # noqa: E731
        lambda a, b: jnp.where(ok.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)
    p2, m2, v2 = keep(p2, p), keep(m2, m), keep(v2, v)
    c2 = jnp.where(ok, c2, c)
    put = lambda t, new: set_slots(t, slots, slots_back(new))  # noqa: E731
    zeros = jax.tree.map(jnp.zeros_like, g)
    return put(pool, p2), put(grads, zeros), put(mu, m2), put(nu, v2), count.at[slots].set(c2), gnorm


@partial(jax.jit, donate_argnames=("pool", "grads", "mu", "nu", "count"))
def lora_optim_step(pool: dict, grads: dict, mu: dict, nu: dict, count: jax.Array, slots: jax.Array,
                    hps: jax.Array, valid: jax.Array):
    """AdamW on `slots` [k] of one pool (hps [k,6]; `_slots_step`)."""
    return _slots_step(optim.adamw, pool, grads, mu, nu, count, slots, hps, valid)


@partial(jax.jit, static_argnames=("rank",), donate_argnames=("pool", "grads", "mu", "nu", "count"))
def lora_dimuon_step(pool: dict, grads: dict, mu: dict, nu: dict, count: jax.Array, slots: jax.Array,
                     hps: jax.Array, valid: jax.Array, *, rank: int):
    """Dimuon (optim.dimuon) on `slots` [k] of the rank-`rank` pool (hps [k,5]; `_slots_step`); nu is unused."""

    def update(p, g, m, v, c, hp):
        p, m, c, gnorm = optim.dimuon(p, g, m, c, hp, rank)
        return p, m, v, c, gnorm

    return _slots_step(update, pool, grads, mu, nu, count, slots, hps, valid)


# ------------------------------------------------------------------------------------------- full fine-tuning


def _full_loss(params, graphdef, batch, layout, remat, attention):
    router: list = []
    lp = target_logprobs(merge(graphdef, params), batch, (), remat, attention, router)
    loss, metrics = row_losses(lp, batch, layout.losses)
    return jnp.sum(loss), (loss, _with_router(metrics, router), lp)


@partial(jax.jit, static_argnames=("graphdef", "layout", "remat", "attention"), donate_argnames=("grads",))
def full_forward_backward(params, grads, batch: dict, *, graphdef, layout: Layout, remat: bool = False,
                          attention: str = "einsum"):
    (_, (loss, metrics, lp)), g = jax.value_and_grad(_full_loss, has_aux=True)(
        params, graphdef, batch, layout, remat, attention)
    return jax.tree.map(jnp.add, grads, g), loss, metrics, lp


@partial(jax.jit, static_argnames=("graphdef", "layout", "attention"))
def full_forward(params, batch: dict, *, graphdef, layout: Layout, attention: str = "einsum"):
    _, (loss, metrics, lp) = _full_loss(params, graphdef, batch, layout, False, attention)
    return loss, metrics, lp


@partial(jax.jit, donate_argnames=("params", "grads", "mu", "nu"))
def full_optim_step(params, grads, mu, nu, count, hp):
    new = optim.adamw(params, grads, mu, nu, count, hp)
    ok = jnp.isfinite(new[4])  # as _slots_step: a gradient that is not finite changes nothing, and is dropped
    params, mu, nu, count = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new[:4], (params, mu, nu, count))
    return params, jax.tree.map(jnp.zeros_like, grads), mu, nu, count, new[4]


def compile_count() -> int:
    """Programs compiled so far by the training step functions (for the recompilation test)."""
    return sum(f._cache_size() for f in (lora_forward_backward, lora_forward, lora_optim_step, lora_dimuon_step,
                                         full_forward_backward, full_forward, full_optim_step))


def device_batch(batch: dict, sharding=None) -> Any:
    """A MicroBatch's arrays on the device (one transfer): rows over the batch mesh axes (`sharding`, for [B,...]
    arrays); the per-segment slot tables replicated."""
    if sharding is None:
        return jax.tree.map(jnp.asarray, batch)
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    shardings = {k: jax.tree.map(lambda _: replicated if k == "lora" else sharding, v) for k, v in batch.items()}
    return jax.device_put(batch, shardings)
