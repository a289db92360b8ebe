"""Weight-only int8 for sampling (`sampler.quantize: int8`): the one place where weights are quantized.

A quantized Linear keeps its kernel [.., in, out] as int8 and one scale per output channel [.., out] (the leading
dims: a stack's layers); it computes y = (x @ kernel) * scale in the compute dtype, which is x @ W' for the
dequantized W' = kernel * scale exactly (the scale is per column of the product). A MoE layer's experts
[.., E, in, out] likewise, with a scale per expert and column [.., E, out] applied to each row by its expert.
Symmetric round-to-nearest: scale = max |W[:, j]| / 127, so every weight is within scale / 2 of its original and
a column's largest one is exact. Quantized: the decoder blocks' projections (QUANTIZED) and MoE experts (EXPERTS);
embeddings, an untied unembedding (the logprobs' last matmul), norms, biases and MoE routers keep the compute
dtype, and LoRA adapters apply on top of the quantized base in the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

QUANTIZED = ("q", "k", "v", "o", "gate", "up", "down")  # models.lora.PROJECTIONS names
EXPERTS = ("gate", "up", "down")  # MoeMLP's stacked expert weights, each with a `{name}_scale`
MODES = ("int8",)


def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [.., in, out] float -> (int8 [.., in, out], fp32 scale [.., out]); an all-zero column gets scale 1."""
    w = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=-2)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale[..., None, :]), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """The float weights a quantized kernel stands for, [.., in, out] fp32 (tests, exports)."""
    return q.astype(jnp.float32) * scale[..., None, :]


def quantize_blocks(module: nnx.Module, mode: str = "int8") -> int:
    """Quantize, in place, every Linear under `module` named in QUANTIZED and every MoE layer's experts (stacked
    weights per layer, expert and column). The module's graph changes (scales become Params): split it again
    afterwards. Returns how many weights were quantized."""
    from tinker_jax.models.decoder import Linear  # the decoder imports this module's users, not the reverse
    from tinker_jax.models.moe import MoeMLP

    if mode not in MODES:
        raise ValueError(f"sampler.quantize: expected one of {MODES} or null, got {mode!r}")
    n = 0
    walk = getattr(nnx, "iter_modules", None)  # flax >= 0.12; Module.iter_modules before (deprecated since)
    for _, m in (walk(module) if walk else module.iter_modules()):
        if isinstance(m, Linear) and m.name in QUANTIZED and m.scale is None:
            m.kernel, m.scale = _quantized(m.kernel)
            n += 1
        elif isinstance(m, MoeMLP) and m.gate_scale is None:
            for name in EXPERTS:
                q, scale = _quantized(getattr(m, name))
                setattr(m, name, q)
                setattr(m, f"{name}_scale", scale)
                n += 1
    return n


def _quantized(param: nnx.Param) -> tuple[nnx.Param, nnx.Param]:
    """An [.., in, out] weight Param -> (its int8 Param, its [.., out] scale Param; both keep the logical axes)."""
    axes = param.get_metadata().get("axes", ())
    q, scale = quantize_int8(param[...])
    # The scale was a static None on the module: nnx.data makes it a data attribute.
    return nnx.Param(q, axes=axes), nnx.data(nnx.Param(scale, axes=tuple(axes[:-2]) + tuple(axes[-1:])))
