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
        out[key] = float(v)
    for key in ("beta1", "beta2"):
        if out[key] >= 1:
            raise UserError(f"{field}.{key}: must be < 1, got {out[key]!r}")
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
