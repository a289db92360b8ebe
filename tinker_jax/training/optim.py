"""AdamW: the one hyperparameter check (both front doors call it) and the update, a pure function of arrays.

The update is optax.adamw's (eps outside the square root, bias correction by the step count, decoupled weight
decay) after optional global-norm clipping, written out so that one run's slot of a stacked adapter pool and a
full fine-tuning run's weights take the same code: `adamw(params, grads, state, hp)` on any pytree.
Hyperparameters are traced values, so a learning-rate schedule never recompiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tinker_jax.errors import UserError

# Field names and defaults of tinker.types.AdamParams (the SDK's defaults apply to missing fields).
DEFAULTS = {"learning_rate": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0,
            "grad_clip_norm": 0.0}


@dataclass(frozen=True)
class AdamHP:
    learning_rate: float = DEFAULTS["learning_rate"]
    beta1: float = DEFAULTS["beta1"]
    beta2: float = DEFAULTS["beta2"]
    eps: float = DEFAULTS["eps"]
    weight_decay: float = DEFAULTS["weight_decay"]
    grad_clip_norm: float = DEFAULTS["grad_clip_norm"]  # <= 0: no clipping

    def array(self) -> np.ndarray:
        """[6] float32 in DEFAULTS order (one traced argument)."""
        return np.asarray([getattr(self, k) for k in DEFAULTS], np.float32)


_F32_MAX = float(np.finfo(np.float32).max)


def check_adam(values: Mapping[str, Any] | Any, field: str = "adam_params") -> AdamHP:
    """Validate Adam hyperparameters (a mapping, or an object with the AdamParams attributes; None/missing fields
    take the SDK's defaults). ValueError naming `field.key` for anything non-finite, negative or beta >= 1."""
    if values is None:
        values = {}
    get = values.get if isinstance(values, Mapping) else (lambda k: getattr(values, k, None))
    out = {}
    for key, default in DEFAULTS.items():
        v = get(key)
        if v is None:
            v = default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"{field}.{key}: must be a finite number, got {v!r}")
        if v < 0:
            raise UserError(f"{field}.{key}: must be >= 0, got {v!r}")
        if v > _F32_MAX:  # the step computes in fp32: inf there turns every weight into NaN
            raise UserError(f"{field}.{key}: must be at most {_F32_MAX:.4g} (fp32), got {v!r}")
        out[key] = float(v)
    for key in ("beta1", "beta2"):
        if out[key] >= 1:
            raise UserError(f"{field}.{key}: must be < 1, got {out[key]!r}")
    if not np.float32(out["eps"]) > 0:  # an element with no gradient (LoRA A at the first step) would be 0 / 0
        raise UserError(f"{field}.eps: must be > 0 (in fp32), got {out['eps']!r}")
    return AdamHP(**out)


class AdamState(NamedTuple):
    mu: Any  # first moments, like params
    nu: Any  # second moments, like params
    count: jax.Array  # int32 scalar (or [S] for a pool): steps taken


def init(params) -> AdamState:
    zeros = jax.tree.map(jnp.zeros_like, params)
    return AdamState(zeros, jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def adamw(params, grads, mu, nu, count, hp: jax.Array):
    """One AdamW step. hp [6] (AdamHP.array order). -> (params, mu, nu, count, grad_norm before clipping)."""
    lr, b1, b2, eps, wd, clip = (hp[i] for i in range(6))
    gnorm = global_norm(grads)
    factor = jnp.where((clip > 0) & (gnorm > clip), clip / jnp.maximum(gnorm, 1e-30), 1.0)
    count = count + 1
    t = count.astype(jnp.float32)
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t

    def one(p, g, m, v):
        g = g * factor
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * jnp.square(g)
        u = (m / c1) / (jnp.sqrt(v / c2) + eps) + wd * p
        return p - lr * u, m, v

    out = jax.tree.map(one, params, grads, mu, nu)
    is_triple = lambda x: isinstance(x, tuple) and len(x) == 3  # noqa: E731
    pick = lambda i: jax.tree.map(lambda x: x[i], out, is_leaf=is_triple)  # noqa: E731
    return pick(0), pick(1), pick(2), count, gnorm


# ------------------------------------------------------------------------------------------------------ Dimuon
#
# The SDK (0.30+) offers Dimuon beside AdamW: chosen at model creation (DimuonOptimizerConfig, fixed for the run's
# life) and stepped with DimuonParams (learning_rate, beta1, grad_clip_norm; later SDKs add damping and
# rank_lr_correction_exponent). Its update rule is not published. What its reference documentation says: the
# learning rate applies "to a direction with Frobenius norm sqrt(rank)", with a rank correction relative to rank 32
# applied uniformly to all LoRA matrices; damping "smooths the row and column preconditioner"; a matrix-sign
# iteration count and a normalization epsilon are internal constants. The closest faithful Muon-family update we
# can write from that, per LoRA matrix X (the last two axes of each adapter leaf, so every layer and expert is its
# own matrix):
#   g <- g * min(1, grad_clip_norm / ||all gradients of the run||)          (when grad_clip_norm > 0)
#   m <- beta1 m + (1 - beta1) g                                             (the momentum; Adam's nu is unused)
#   n = m / rms(m);  P = n / ((rowmean(n^2) + damping)^(1/4) (colmean(n^2) + damping)^(1/4))   (row/col precond.)
#   O = msign(P) by DIMUON_NS_STEPS Newton-Schulz iterations (Muon's quintic), rescaled to ||O||_F = sqrt(rank)
#   X <- X - learning_rate * (32 / rank) ** rank_lr_correction_exponent * O
# Dimuon is offered for LoRA runs (its documentation speaks only of LoRA matrices); full fine-tuning refuses it.

DIMUON_DEFAULTS = {"learning_rate": None, "beta1": 0.9, "grad_clip_norm": 0.0, "damping": 0.1,
                   "rank_lr_correction_exponent": 0.0}
DIMUON_NS_STEPS = 5
DIMUON_NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton-Schulz (K. Jordan, 2024)
DIMUON_EPS = 1e-7
OPTIMIZERS = ("adamw", "dimuon")


@dataclass(frozen=True)
class DimuonHP:
    learning_rate: float
    beta1: float = DIMUON_DEFAULTS["beta1"]
    grad_clip_norm: float = DIMUON_DEFAULTS["grad_clip_norm"]  # <= 0: no clipping
    damping: float = DIMUON_DEFAULTS["damping"]
    rank_lr_correction_exponent: float = DIMUON_DEFAULTS["rank_lr_correction_exponent"]

    kind = "dimuon"

    def array(self) -> np.ndarray:
        """[5] float32 in DIMUON_DEFAULTS order (one traced argument)."""
        return np.asarray([getattr(self, k) for k in DIMUON_DEFAULTS], np.float32)


AdamHP.kind = "adamw"


def optimizer_kind(config: Any, field: str = "optimizer_config") -> str:
    """The optimizer a model is created with: None -> "adamw"; "adamw" / "adam" / "dimuon", a mapping or an object
    with `type` (tinker's AdamOptimizerConfig / DimuonOptimizerConfig). UserError naming `field` otherwise."""
    if config is None:
        return "adamw"
    kind = config if isinstance(config, str) else (
        config.get("type") if isinstance(config, Mapping) else getattr(config, "type", None))
    kind = "adamw" if kind in (None, "adam") else kind
    if kind not in OPTIMIZERS:
        raise UserError(f"{field}.type: unknown optimizer {kind!r}; expected one of {', '.join(OPTIMIZERS)}")
    version = config.get("version") if isinstance(config, Mapping) else getattr(config, "version", None)
    if kind == "dimuon" and version not in (None, 1):
        raise UserError(f"{field}.version: Dimuon version {version!r} is not supported (only 1)")
    return kind


def check_optim_params(values: Mapping[str, Any] | Any, field: str = "adam_params") -> "AdamHP | DimuonHP":
    """One optim_step's hyperparameters, by their `type` (absent or "adam"/"adamw": AdamParams; "dimuon":
    DimuonParams), each family checked by its own rules."""
    kind = (values.get("type") if isinstance(values, Mapping) else getattr(values, "type", None)) \
        if values is not None else None
    if kind == "dimuon":
        return check_dimuon(values, field)
    if kind not in (None, "adam", "adamw"):
        raise UserError(f"{field}.type: unknown optimizer {kind!r}; expected one of {', '.join(OPTIMIZERS)}")
    return check_adam(values, field)


def check_dimuon(values: Mapping[str, Any] | Any, field: str = "optimizer_params") -> DimuonHP:
    """Validate Dimuon hyperparameters as the SDK's DimuonParams does (learning_rate required and >= 0, 0 <= beta1
    < 1, damping > 0; None/missing optional fields take the defaults). UserError naming `field.key`."""
    get = values.get if isinstance(values, Mapping) else (lambda k: getattr(values, k, None))
    out = {}
    for key, default in DIMUON_DEFAULTS.items():
        v = get(key)
        if v is None:
            if default is None:
                raise UserError(f"{field}.{key}: required for Dimuon")
            v = default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"{field}.{key}: must be a finite number, got {v!r}")
        out[key] = float(v)
    for key in ("learning_rate", "beta1", "rank_lr_correction_exponent"):
        if out[key] < 0:
            raise UserError(f"{field}.{key}: must be >= 0, got {out[key]!r}")
    if out["beta1"] >= 1:
        raise UserError(f"{field}.beta1: must be < 1, got {out['beta1']!r}")
    if out["damping"] <= 0:
        raise UserError(f"{field}.damping: must be > 0, got {out['damping']!r}")
    return DimuonHP(**out)


def msign(x: jax.Array) -> jax.Array:
    """[..., m, n] -> each matrix's orthogonal polar factor U V^T, approximately (Newton-Schulz on the smaller Gram
    matrix; singular values land near 1, not exactly: the caller fixes the norm it needs)."""
    wide = x.shape[-2] > x.shape[-1]
    if wide:
        x = jnp.swapaxes(x, -1, -2)
    x = x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)) + DIMUON_EPS)
    a, b, c = DIMUON_NS_COEFFS
    for _ in range(DIMUON_NS_STEPS):
        gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return jnp.swapaxes(x, -1, -2) if wide else x


def dimuon(params, grads, mu, count, hp: jax.Array, rank: int):
    """One Dimuon step of a LoRA adapter of `rank` (every leaf [..., m, n]: a stack of matrices). hp [5]
    (DimuonHP.array order). -> (params, mu, count, grad_norm before clipping). See the notes above."""
    lr, b1, clip, damping, expo = (hp[i] for i in range(5))
    gnorm = global_norm(grads)
    factor = jnp.where((clip > 0) & (gnorm > clip), clip / jnp.maximum(gnorm, 1e-30), 1.0)
    step = lr * (32.0 / rank) ** expo

    def one(p, g, m):
        m = b1 * m + (1 - b1) * (g * factor)
        n = m / (jnp.sqrt(jnp.mean(jnp.square(m), axis=(-2, -1), keepdims=True)) + DIMUON_EPS)
        sq = jnp.square(n)
        pre = n / ((jnp.mean(sq, axis=-1, keepdims=True) + damping) ** 0.25
                   * (jnp.mean(sq, axis=-2, keepdims=True) + damping) ** 0.25)
        o = msign(pre)
        o = o * (math.sqrt(rank) / (jnp.sqrt(jnp.sum(jnp.square(o), axis=(-2, -1), keepdims=True)) + DIMUON_EPS))
        return p - step * o, m

    out = jax.tree.map(one, params, grads, mu)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2  # noqa: E731
    pick = lambda i: jax.tree.map(lambda x: x[i], out, is_leaf=is_pair)  # noqa: E731
    return pick(0), pick(1), count + 1, gnorm
