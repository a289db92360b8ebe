"""Mixture-of-Experts feed-forward, as Qwen3-MoE computes it (the decoder's feed-forward when the config has experts).

Routing: router logits x @ router [N,E] in the compute dtype, softmax in fp32, top-k experts per token, their
probabilities renormalised to sum to 1 only when `norm_topk_prob`, then cast back to the compute dtype.

Experts: SwiGLU per expert, `down(silu(gate(x)) * up(x))`, weighted by the token's routing weight and summed over
its k experts. Dropless: every (token, expert) assignment is computed, none is dropped for capacity. The N*k
assignments are sorted by expert and each expert's run of rows goes through one grouped matmul
(models.grouped: jax.lax.ragged_dot on TPUs; elsewhere padded blocks of one expert each, because ragged_dot there
computes every expert for every row), so the cost follows the active parameters (k experts per token), not all E.

Adapters: each expert's gate, up and down projections carry their own LoRA (models.lora.apply_experts), so one
forward pass serves the rows of several runs, each with its own experts' adapters.

Load balancing: `load_balancing_loss` is transformers' Switch-Transformer auxiliary loss over every MoE layer's
router logits (padding rows excluded by a mask).

Shapes: N tokens (rows of the batch flattened), D model width, E experts, I expert width, k experts per token.
Weights are stacked along the expert axis: gate and up [E,D,I], down [E,I,D], router [D,E].
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tinker_jax.models import lora as lora_math
from tinker_jax.models.grouped import grouped_matmul
from tinker_jax.models.lora import LoraRows


def route(x: jax.Array, router: jax.Array, top_k: int, norm_topk_prob: bool):
    """x [N,D], router [D,E] -> (logits [N,E] fp32, weights [N,k] in x's dtype, experts [N,k] int32)."""
    logits = (x @ router.astype(x.dtype)).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return logits, weights.astype(x.dtype), experts.astype(jnp.int32)


def experts_ffn(x: jax.Array, experts: jax.Array, weights: jax.Array, gate: jax.Array, up: jax.Array,
                down: jax.Array, lora: Sequence[LoraRows] = (), tokens_per_row: int = 1,
                impl: str = "auto", scales: tuple[jax.Array, jax.Array, jax.Array] | None = None) -> jax.Array:
    """x [N,D]; experts, weights [N,k]; gate, up [E,D,I]; down [E,I,D] -> [N,D]: each token's weighted sum of its
    experts' SwiGLU outputs, dropless. `lora`: per-expert adapters of the batch rows (token n is in row
    n // tokens_per_row). `impl`: the grouped matmul's (models.grouped). `scales`: int8 expert weights'
    per-(expert, column) scales, [E,I], [E,I], [E,D] (models.quant); the matmul reads the int8 weights."""
    n, k = experts.shape
    n_experts = gate.shape[0]
    flat = experts.reshape(n * k)
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert, each group in token order
    rows = order // k  # the token of each sorted assignment
    xs = x[rows]  # [N*k, D]
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)  # rows per expert, in expert order
    dt = x.dtype
    batch_rows = rows // tokens_per_row
    by_expert = flat[order]  # [N*k]: the expert of each sorted assignment
    gs, us, ds = scales if scales is not None else (None, None, None)

    def proj(name, inp, w, scale):
        y = grouped_matmul(inp, w, sizes, impl)  # w cast to x's dtype where it is read (int8: after the gather)
        if scale is not None:  # x @ (w * scale[e]) for the row's expert e: the scale is per output column
            y = y * scale.astype(dt)[by_expert]
        return lora_math.apply_experts(y, inp, lora, name, sizes, batch_rows, impl) if lora else y

    h = jax.nn.silu(proj("gate", xs, gate, gs)) * proj("up", xs, up, us)
    out = proj("down", h, down, ds)  # [N*k, D]
    out = out * weights.reshape(n * k)[order][:, None]
    return jnp.zeros_like(x).at[rows].add(out)


def load_balancing_loss(logits: jax.Array, top_k: int, mask: jax.Array | None = None) -> jax.Array:
    """Switch-Transformer auxiliary loss as transformers computes it (`load_balancing_loss_func`): logits
    [L,N,E] (every MoE layer's router logits), mask [N] (1 for real tokens) -> scalar
    E * sum_e(fraction of top-k assignments to e) * (mean router probability of e), over all layers' rows."""
    n_layers, n, _ = logits.shape
    m = jnp.ones((1, n), jnp.float32) if mask is None else mask.astype(jnp.float32)[None]
    stats = sum(row_router_stats(logits[i][None], m, top_k)[0] for i in range(n_layers))  # [2,E], all rows as one
    return _balance(stats, n_layers * jnp.sum(m))


def row_router_stats(logits: jax.Array, real: jax.Array, top_k: int) -> jax.Array:
    """logits [B,T,E] of one layer, real [B,T] (1 for real tokens) -> [B,2,E]: per row, the top-k assignments to
    each expert and each expert's summed routing probability, over the row's real tokens."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    _, chosen = jax.lax.top_k(probs, top_k)
    counts = jnp.sum(jax.nn.one_hot(chosen, probs.shape[-1], dtype=jnp.float32), axis=2)  # [B,T,E]
    return jnp.stack([jnp.einsum("bte,bt->be", counts, real), jnp.einsum("bte,bt->be", probs, real)], axis=1)


def balance_from_stats(stats, n_layers: int, n_tokens: float) -> float:
    """The load-balancing loss of a set of rows from their summed `row_router_stats` ([2,E], over every layer) and
    their real token count: E * sum_e (assignment fraction of e) * (mean probability of e), as
    `load_balancing_loss` computes it over those rows' router logits."""
    rows = n_layers * n_tokens
    return float(_balance(np.asarray(stats, np.float64), rows)) if rows else 0.0


def _balance(stats, rows):
    """E * sum_e (assignments to e / rows) * (probability mass of e / rows), from summed stats [2,E] (jnp or numpy)."""
    counts, mass = stats[0], stats[1]
    return counts.shape[0] * ((counts / rows) * (mass / rows)).sum()


class MoeMLP(nnx.Module):
    """The MoE feed-forward of one layer: router [D,E] and stacked experts (logical axes: `expert` for the expert
    axis, then as the dense MLP's). __call__(x [B,T,D], lora) -> y [B,T,D]; `forward` also returns the router logits
    [B*T,E] fp32 (for the load-balancing loss)."""

    def __init__(self, d_model: int, d_expert: int, n_experts: int, top_k: int, norm_topk_prob: bool, *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32, impl: str = "auto"):
        init = nnx.initializers.normal(0.02)
        self.router = nnx.Param(init(rngs.params(), (d_model, n_experts), param_dtype), axes=("embed", None))
        self.gate = nnx.Param(init(rngs.params(), (n_experts, d_model, d_expert), param_dtype),
                              axes=("expert", "embed", "mlp"))
        self.up = nnx.Param(init(rngs.params(), (n_experts, d_model, d_expert), param_dtype),
                            axes=("expert", "embed", "mlp"))
        self.down = nnx.Param(init(rngs.params(), (n_experts, d_expert, d_model), param_dtype),
                              axes=("expert", "mlp", "embed"))
        self.top_k, self.norm_topk_prob, self.impl = top_k, norm_topk_prob, impl  # impl: models.grouped
        # [E, out] per-(expert, column) scales of int8 gate / up / down (models.quant; the sampler's weights only)
        self.gate_scale = self.up_scale = self.down_scale = None

    def __call__(self, x: jax.Array, lora: tuple[LoraRows, ...] = ()) -> jax.Array:
        return self.forward(x, lora)[0]

    def forward(self, x: jax.Array, lora: tuple[LoraRows, ...] = ()) -> tuple[jax.Array, jax.Array]:
        B, T, D = x.shape
        x2 = x.reshape(B * T, D)
        logits, weights, experts = route(x2, self.router[...], self.top_k, self.norm_topk_prob)
        scales = None if self.gate_scale is None else (self.gate_scale[...], self.up_scale[...], self.down_scale[...])
        y = experts_ffn(x2, experts, weights, self.gate[...], self.up[...], self.down[...], lora, T, self.impl,
                        scales)
        return y.reshape(B, T, D), logits
