"""Tinker's built-in losses as pure JAX functions, registered by their `loss_fn` name.

Every loss is the SUM of per-token losses over all real tokens of all datums (Tinker semantics): no mean, no
per-sequence normalisation. The caller decides any normalisation and adds `loss:sum` to the metrics itself.

Shapes: B batch rows (one datum per row), T tokens, K top-K targets (cross_entropy distillation only).
  lp      [B,T] float32 learner logprobs of the target tokens ([B,T,K] for top-K cross_entropy)
  inputs  dict of float32 [B,T] loss_fn_inputs (`weights` is [B,T,K] with top-K targets)
  mask    [B,T] float32, 1 = real token, 0 = padding
Padding must add exactly zero loss and zero gradient even when the padded inputs hold inf/nan, so every function
first replaces padded values with 0 (`jnp.where`, never a multiply: 0 * inf = nan, and a nan in an unselected
branch still poisons the gradient) and masks the per-token loss again at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from tinker_jax.errors import UserError

sg = jax.lax.stop_gradient

# Tinker's PPO docs fix eps_low = eps_high = 0.2.
PPO_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
# tinker-cookbook's CISPO tutorial: no lower bound on the detached IS weight, upper bound 4.
CISPO_CLIP = {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
# The Tinker docs state no GSPO default; we reuse PPO's (the GSPO paper itself used eps 3e-4 / 4e-4, i.e. much
# tighter thresholds, which callers should pass explicitly in loss_fn_config).
GSPO_CLIP = dict(PPO_CLIP)
# The Tinker docs state no DRO default; 0.05 is the value their "Custom beta" example passes.
DRO_BETA = 0.05
# StableReinforce: Tinker publishes its inputs (recorded samples, provenance spans, a `kl_coeff`) but not its
# objective; ours is documented in DESIGN.md. Truncation at 2 follows truncated importance sampling (Yao et al.,
# 2025, "Your efficient RL framework secretly brings you off-policy RL training"); no KL penalty unless asked.
STABLE_REINFORCE = {"clip_high_threshold": 2.0, "kl_coeff": 0.0}
# exp of a larger log ratio overflows float32: past it, the ratio in the KL term continues linearly in log r (its
# tangent at the cap), so the penalty keeps pulling on those tokens with a finite gradient.
LOG_RATIO_CAP = 20.0

# Per-token clip thresholds: the SDK coerces these loss_fn_inputs keys to float32, so a datum may carry them.
# When present (already padded to [B,T]) they override the config value.
_CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]  # (lp, inputs, mask, config) -> (loss_sum, metrics)
    required_inputs: tuple[str, ...]  # loss_fn_inputs besides target_tokens that must be present
    optional_inputs: tuple[str, ...]
    config_defaults: Mapping[str, float]


def _real(mask: jax.Array, x: jax.Array) -> jax.Array:
    """x with padded positions set to 0, so no inf/nan there reaches the value or the gradient."""
    m = mask > 0
    return jnp.where(m if x.ndim == m.ndim else m[..., None], x, 0.0)


def _sanitize(lp, inputs, mask, keys):
    return _real(mask, lp), {k: _real(mask, inputs[k]) for k in keys if k in inputs}


def _masked_sum(per_token: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(_real(mask, per_token), dtype=jnp.float32)


def _clip_bounds(x: dict[str, jax.Array], config: Mapping[str, Any]):
    return tuple(x.get(k, config[k]) for k in _CLIP_INPUTS)


def _clipped_tokens(ratio, lo, hi, mask) -> dict[str, jax.Array]:
    # A count (":sum") rather than a fraction: it composes exactly across micro-batches and SDK chunks.
    out = jnp.logical_or(ratio < lo, ratio > hi).astype(jnp.float32)
    return {"clipped_tokens:sum": _masked_sum(out, mask)}


def cross_entropy(lp, inputs, mask, config):
    """-lp * w. w may be any float (forward_backward_custom sends -dC/dlp, often negative); absent -> ones."""
    lp, x = _sanitize(lp, inputs, mask, ("weights",))
    w = x.get("weights", jnp.ones_like(lp))  # [B,T] or [B,T,K] like lp
    return _masked_sum(-lp * w, mask), {}


def importance_sampling(lp, inputs, mask, config):
    """-r * A with r = exp(lp - q): REINFORCE corrected for sampler/learner mismatch."""
    lp, x = _sanitize(lp, inputs, mask, ("logprobs", "advantages"))
    ratio = jnp.exp(lp - x["logprobs"])
    return _masked_sum(-ratio * x["advantages"], mask), {}


def ppo(lp, inputs, mask, config):
    """-min(r * A, clip(r, lo, hi) * A)."""
    lp, x = _sanitize(lp, inputs, mask, ("logprobs", "advantages", *_CLIP_INPUTS))
    lo, hi = _clip_bounds(x, config)
    ratio, adv = jnp.exp(lp - x["logprobs"]), x["advantages"]
    per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, lo, hi) * adv)
    return _masked_sum(per_token, mask), _clipped_tokens(ratio, lo, hi, mask)


def cispo(lp, inputs, mask, config):
    """-sg(clip(r, lo, hi)) * lp * A: the IS weight is clipped and detached, so every token keeps a gradient."""
    lp, x = _sanitize(lp, inputs, mask, ("logprobs", "advantages", *_CLIP_INPUTS))
    lo, hi = _clip_bounds(x, config)
    ratio = jnp.exp(lp - x["logprobs"])
    per_token = -sg(jnp.clip(ratio, lo, hi)) * lp * x["advantages"]
    return _masked_sum(per_token, mask), _clipped_tokens(ratio, lo, hi, mask)


def dro(lp, inputs, mask, config):
    """-(lp * A - 0.5 * beta * (lp - q)^2): a quadratic penalty keeps the learner near the sampler."""
    lp, x = _sanitize(lp, inputs, mask, ("logprobs", "advantages"))
    per_token = -(lp * x["advantages"] - 0.5 * config["beta"] * jnp.square(lp - x["logprobs"]))
    return _masked_sum(per_token, mask), {}


def gspo(lp, inputs, mask, config):
    """GSPO-token: every token carries its row's sequence ratio s as value and its own lp's gradient.

    log s[B] = mean of (sg(lp) - q) over tokens marked by mask * sequence_ratio_mask (absent -> all real tokens);
    a row with no marked token gets s = 1 (Tinker's torch mean would give nan). Then PPO-style min/clip per token,
    summed over all real tokens.
    """
    lp, x = _sanitize(lp, inputs, mask, ("logprobs", "advantages", "sequence_ratio_mask", *_CLIP_INPUTS))
    lo, hi = _clip_bounds(x, config)
    in_ratio = _real(mask, (x.get("sequence_ratio_mask", jnp.ones_like(lp)) != 0).astype(jnp.float32))  # [B,T]
    n_ratio = jnp.sum(in_ratio, axis=-1, keepdims=True)  # [B,1]
    log_s = jnp.sum(in_ratio * (sg(lp) - x["logprobs"]), axis=-1, keepdims=True) / jnp.maximum(n_ratio, 1.0)
    ratio = jnp.exp(sg(log_s) + lp - sg(lp))  # [B,T]: value s, d ratio / d lp = ratio
    adv = x["advantages"]
    per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, lo, hi) * adv)
    return _masked_sum(per_token, mask), _clipped_tokens(ratio, lo, hi, mask)


def stable_reinforce(lp, inputs, mask, config):
    """On sampled tokens only (`sampled_mask`, written by the server from the recorded samples, with `logprobs`
    the recorded sampler logprobs q): -sg(min(r, C)) * A * lp + kl_coeff * (r - 1 - log r), r = exp(lp - q).

    REINFORCE weighted by the truncated importance ratio, so stale (off-policy) samples cannot blow up a step,
    plus the k3 estimate of KL(sampler || learner) as an optional penalty. Other positions (prompt tokens the
    provenance names, placeholders) add nothing.
    """
    lp, x = _sanitize(lp, inputs, mask, ("logprobs", "advantages", "sampled_mask"))
    on = (x["sampled_mask"] != 0) & (mask > 0)
    log_r = jnp.where(on, lp - x["logprobs"], 0.0)
    ratio = jnp.exp(jnp.minimum(log_r, LOG_RATIO_CAP))
    hi = config["clip_high_threshold"]
    r_kl = ratio * (1.0 + jnp.maximum(log_r - LOG_RATIO_CAP, 0.0))  # = r up to the cap
    kl = r_kl - 1.0 - log_r  # >= 0, 0 on-policy; d/dlp = r - 1
    per_token = -sg(jnp.minimum(ratio, hi)) * x["advantages"] * lp + config["kl_coeff"] * kl
    clipped = jnp.where(on & (ratio > hi), 1.0, 0.0)
    return _masked_sum(jnp.where(on, per_token, 0.0), mask), {"clipped_tokens:sum": _masked_sum(clipped, mask),
                                                              "kl_to_sampler:sum": _masked_sum(sg(kl), mask)}


_RL_INPUTS = ("logprobs", "advantages")

LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec("cross_entropy", cross_entropy, (), ("weights",), {}),
        LossSpec("importance_sampling", importance_sampling, _RL_INPUTS, (), {}),
        LossSpec("ppo", ppo, _RL_INPUTS, _CLIP_INPUTS, PPO_CLIP),
        LossSpec("cispo", cispo, _RL_INPUTS, _CLIP_INPUTS, CISPO_CLIP),
        LossSpec("dro", dro, _RL_INPUTS, (), {"beta": DRO_BETA}),
        LossSpec("gspo", gspo, _RL_INPUTS, ("sequence_ratio_mask", *_CLIP_INPUTS), GSPO_CLIP),
        # logprobs and sampled_mask come from the server's records (engine.stability), not from the client.
        LossSpec("stable_reinforce", stable_reinforce, (*_RL_INPUTS, "sampled_mask"), (), STABLE_REINFORCE),
    )
}


def input_fill(key: str, config: Mapping[str, float]) -> float:
    """The value an absent optional loss_fn_input stands for, token by token: all ones for cross_entropy `weights`
    and gspo's `sequence_ratio_mask`, the config's threshold for per-token clip thresholds; 0 otherwise (rows of
    another loss in a mixed batch, which never read it)."""
    if key in _CLIP_INPUTS:
        return float(config.get(key, 0.0))
    return 1.0 if key in ("weights", "sequence_ratio_mask") else 0.0


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown loss_fn {name!r}; supported: {', '.join(LOSSES)}") from None


def resolve_config(name: str, config: Mapping[str, Any] | None) -> dict[str, float]:
    """The loss's defaults overlaid with `config`; ValueError naming any unknown key or non-numeric value."""
    spec = get_loss(name)
    if config is not None and not isinstance(config, Mapping):
        raise UserError(f"loss_fn_config: expected a dict of numbers, got {type(config).__name__} "
                        f"{str(config)[:80]!r}")
    config = dict(config or {})
    unknown = sorted(set(config) - set(spec.config_defaults))
    if unknown:
        allowed = ", ".join(spec.config_defaults) or "none"
        raise UserError(f"unknown loss_fn_config key(s) {unknown} for loss_fn {name!r}; allowed: {allowed}")
    out = dict(spec.config_defaults)
    for key, value in config.items():
        try:
            out[key] = float(value)  # loss_fn_config_v2 may carry numbers as text
        except (TypeError, ValueError):
            raise UserError(f"loss_fn_config[{key!r}] for {name!r} must be a number, got {value!r}") from None
        if not math.isfinite(out[key]):
            raise UserError(f"loss_fn_config[{key!r}] for {name!r} must be finite, got {value!r}")
    if name == "stable_reinforce" and (out["clip_high_threshold"] <= 0 or out["kl_coeff"] < 0):
        raise UserError(f"loss_fn_config for {name!r}: clip_high_threshold must be > 0 and kl_coeff >= 0, got "
                        f"{out['clip_high_threshold']} and {out['kl_coeff']}")
    if "clip_low_threshold" in out and out["clip_low_threshold"] > out["clip_high_threshold"]:
        raise UserError(
            f"loss_fn_config for {name!r}: clip_low_threshold {out['clip_low_threshold']} > "
            f"clip_high_threshold {out['clip_high_threshold']}"
        )
    return out


validate = resolve_config  # the name DESIGN.md uses
