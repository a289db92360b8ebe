"""tinker_jax.training.losses against independent torch-autograd references (float64) on padded random batches.

The references work datum by datum on the real tokens only (the way Tinker's docs write each loss), so they
share no masking code with the JAX implementation; gradients come from torch autograd.
"""

from __future__ import annotations

import typing
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tinker_jax.training import losses

LENGTHS = (13, 7, 0, 10, 1)  # one full row, ragged rows, an all-padding row (bucket filler), a 1-token row
B, T, K = len(LENGTHS), 13, 3
RL_NAMES = ("importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce")


def make_batch(seed: int, top_k: bool = False):
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None, :] < np.array(LENGTHS)[:, None]).astype(np.float32)  # [B,T]
    lp_shape = (B, T, K) if top_k else (B, T)
    lp = np.log(rng.uniform(0.05, 0.95, lp_shape)).astype(np.float32)
    q = lp[..., 0] if top_k else lp
    inputs = {
        "weights": rng.normal(0.0, 1.5, lp_shape).astype(np.float32),  # includes negatives (custom-loss path)
        # sampler logprobs ~ learner +- 0.3 nats: ratios spread well past the 0.8/1.2 clip thresholds
        "logprobs": (q + rng.normal(0.0, 0.3, (B, T))).astype(np.float32),
        "advantages": rng.normal(0.0, 1.0, (B, T)).astype(np.float32),
        "sequence_ratio_mask": (rng.uniform(size=(B, T)) < 0.7).astype(np.float32),
        "sampled_mask": (rng.uniform(size=(B, T)) < 0.6).astype(np.float32),  # stable_reinforce: sampled tokens
    }
    return lp, inputs, mask


# ---- torch references: one datum at a time, real tokens only ----------------------------------------------


def ref_token_losses(name, lp, x, cfg):
    """Per-token loss of one datum: lp [n] (or [n,K]) requires grad; x holds that datum's [n] inputs."""
    if name == "cross_entropy":
        return -lp * x["weights"]
    q, adv = x["logprobs"], x["advantages"]
    r = torch.exp(lp - q)
    if name == "importance_sampling":
        return -r * adv
    if name == "ppo":
        lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
        return -torch.minimum(r * adv, torch.clamp(r, lo, hi) * adv)
    if name == "cispo":
        lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
        return -torch.clamp(r, lo, hi).detach() * lp * adv
    if name == "dro":
        return -(lp * adv - 0.5 * cfg["beta"] * (lp - q) ** 2)
    if name == "gspo":
        lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
        in_ratio = x["sequence_ratio_mask"] != 0
        log_s = (lp.detach() - q)[in_ratio].mean() if in_ratio.any() else torch.zeros((), dtype=lp.dtype)
        ratio = torch.exp(log_s + lp - lp.detach())
        return -torch.minimum(ratio * adv, torch.clamp(ratio, lo, hi) * adv)
    if name == "stable_reinforce":  # our documented objective (DESIGN.md): sampled tokens only
        on = x["sampled_mask"] != 0
        per = -torch.clamp(r, max=cfg["clip_high_threshold"]).detach() * adv * lp + cfg["kl_coeff"] * (
            r - 1 - (lp - q))
        return torch.where(on, per, torch.zeros_like(per))
    raise AssertionError(name)


def reference(name, lp, inputs, mask, cfg):
    """(loss, dloss/dlp [padded like lp, zero at padding]) in float64."""
    total, grad = torch.zeros((), dtype=torch.float64), np.zeros(lp.shape, np.float64)
    for b, n in enumerate(LENGTHS):
        if n == 0:
            continue
        lp_b = torch.tensor(lp[b, :n], dtype=torch.float64, requires_grad=True)
        x_b = {k: torch.tensor(v[b, :n], dtype=torch.float64) for k, v in inputs.items()}
        loss_b = ref_token_losses(name, lp_b, x_b, cfg).sum()
        (g,) = torch.autograd.grad(loss_b, lp_b)
        total = total + loss_b.detach()
        grad[b, :n] = g.numpy()
    return float(total), grad


def run_jax(name, lp, inputs, mask, cfg):
    """value_and_grad under jit, with the config traced as the training step would pass it."""
    fn = losses.get_loss(name).fn
    step = jax.jit(jax.value_and_grad(fn, has_aux=True))
    jinputs = {k: jnp.asarray(v) for k, v in inputs.items()}
    (loss, metrics), grad = step(jnp.asarray(lp), jinputs, jnp.asarray(mask), cfg)
    return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}


def assert_matches(name, lp, inputs, mask, cfg):
    loss, grad, metrics = run_jax(name, lp, inputs, mask, cfg)
    ref_loss, ref_grad = reference(name, lp, inputs, mask, cfg)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert np.all(grad[mask == 0] == 0.0)
    return metrics


# ---- values and gradients --------------------------------------------------------------------------------

CUSTOM = {
    "ppo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "cispo": {"clip_low_threshold": 0.5, "clip_high_threshold": 1.3},
    "dro": {"beta": 0.3},
    "gspo": {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05},
    "stable_reinforce": {"clip_high_threshold": 1.1, "kl_coeff": 0.3},
}


@pytest.mark.parametrize(
    "name, custom", [(n, False) for n in ["cross_entropy", *RL_NAMES]] + [(n, True) for n in CUSTOM]
)
def test_value_and_grad_match_reference(name, custom):
    lp, inputs, mask = make_batch(seed=zlib.crc32(f"{name}{custom}".encode()))
    cfg = losses.resolve_config(name, CUSTOM[name] if custom else None)
    metrics = assert_matches(name, lp, inputs, mask, cfg)
    assert all(key.count(":") == 1 for key in metrics)
    assert "loss:sum" not in metrics  # the caller adds it


def test_cross_entropy_negative_weights_closed_form():
    lp, inputs, mask = make_batch(seed=1)
    assert (inputs["weights"][mask > 0] < 0).any()
    loss, grad, _ = run_jax("cross_entropy", lp, {"weights": inputs["weights"]}, mask, {})
    np.testing.assert_allclose(loss, -np.sum(lp * inputs["weights"] * mask, dtype=np.float64), rtol=1e-5)
    np.testing.assert_array_equal(grad, -inputs["weights"] * mask)


def test_cross_entropy_top_k():
    lp, inputs, mask = make_batch(seed=2, top_k=True)  # lp, weights [B,T,K]
    assert_matches("cross_entropy", lp, {"weights": inputs["weights"]}, mask, {})


def test_cross_entropy_without_weights_is_all_ones():
    lp, inputs, mask = make_batch(seed=3)
    loss, grad, _ = run_jax("cross_entropy", lp, {}, mask, {})
    np.testing.assert_allclose(loss, -np.sum(lp * mask, dtype=np.float64), rtol=1e-5)
    np.testing.assert_array_equal(grad, -mask)


def test_gspo_without_sequence_ratio_mask_uses_all_real_tokens():
    lp, inputs, mask = make_batch(seed=4)
    cfg = losses.resolve_config("gspo", CUSTOM["gspo"])
    without = {k: v for k, v in inputs.items() if k != "sequence_ratio_mask"}
    ones = dict(without, sequence_ratio_mask=np.ones_like(mask))
    a, b = run_jax("gspo", lp, without, mask, cfg), run_jax("gspo", lp, ones, mask, cfg)
    assert a[0] == b[0] and a[2] == b[2]
    np.testing.assert_array_equal(a[1], b[1])
    assert_matches("gspo", lp, ones, mask, cfg)


def test_gspo_ratio_is_sequence_level():
    """With one advantage per row and no clipping, d loss / d lp = -A * s for every real token of the row."""
    lp, inputs, mask = make_batch(seed=5)
    inputs["advantages"] = np.repeat(inputs["advantages"][:, :1], T, axis=1)
    srm = inputs["sequence_ratio_mask"]
    cfg = {"clip_low_threshold": 0.0, "clip_high_threshold": 1e9}
    _, grad, _ = run_jax("gspo", lp, inputs, mask, cfg)
    for b, n in enumerate(LENGTHS):
        sel = srm[b, :n] != 0
        s = np.exp(np.mean((lp[b, :n] - inputs["logprobs"][b, :n])[sel], dtype=np.float64)) if sel.any() else 1.0
        np.testing.assert_allclose(grad[b, :n], -inputs["advantages"][b, :n] * s, rtol=1e-5)


@pytest.mark.parametrize("name", ["ppo", "cispo", "gspo"])
def test_clipped_tokens_metric(name):
    lp, inputs, mask = make_batch(seed=6)
    cfg = losses.resolve_config(name, None)
    _, _, metrics = run_jax(name, lp, inputs, mask, cfg)
    lo, hi = cfg["clip_low_threshold"], cfg["clip_high_threshold"]
    if name == "gspo":
        m = mask * inputs["sequence_ratio_mask"]
        log_s = np.sum(m * (lp - inputs["logprobs"]), 1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1)
        ratio = np.broadcast_to(np.exp(log_s), lp.shape)
    else:
        ratio = np.exp(lp - inputs["logprobs"])
    expected = np.sum(((ratio < lo) | (ratio > hi)) & (mask > 0))
    assert expected > 0 or name == "cispo"
    assert metrics == {"clipped_tokens:sum": float(expected)}


def test_stable_reinforce_metrics_and_on_policy_gradient():
    """Truncated tokens are counted where r > C on sampled tokens; the KL metric is the k3 sum there. On policy
    (q = lp) the gradient is exactly -A on sampled tokens and 0 elsewhere, with or without the KL penalty."""
    lp, inputs, mask = make_batch(seed=11)
    cfg = losses.resolve_config("stable_reinforce", {"kl_coeff": 0.5, "clip_high_threshold": 1.2})
    _, _, metrics = run_jax("stable_reinforce", lp, inputs, mask, cfg)
    on = (inputs["sampled_mask"] != 0) & (mask > 0)
    log_r = (lp - inputs["logprobs"]).astype(np.float64)
    assert np.sum(on & (np.exp(log_r) > 1.2)) > 0
    assert metrics["clipped_tokens:sum"] == float(np.sum(on & (np.exp(log_r) > 1.2)))
    np.testing.assert_allclose(metrics["kl_to_sampler:sum"], np.sum((np.exp(log_r) - 1 - log_r)[on]), rtol=1e-5)
    on_policy = dict(inputs, logprobs=lp.copy())
    loss, grad, metrics = run_jax("stable_reinforce", lp, on_policy, mask, cfg)
    np.testing.assert_allclose(grad, np.where(on, -inputs["advantages"], 0.0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loss, np.sum((-inputs["advantages"] * lp)[on]), rtol=1e-5)
    assert metrics == {"clipped_tokens:sum": 0.0, "kl_to_sampler:sum": 0.0}


def test_stable_reinforce_huge_ratio_stays_finite():
    lp, inputs, mask = make_batch(seed=12)
    far = dict(inputs, logprobs=np.full_like(lp, -80.0), advantages=np.zeros_like(lp))  # r = e^(lp + 80)
    loss, grad, metrics = run_jax("stable_reinforce", lp, far, mask, losses.resolve_config(
        "stable_reinforce", {"kl_coeff": 1.0}))
    assert np.isfinite(loss) and np.all(np.isfinite(grad)) and all(np.isfinite(v) for v in metrics.values())
    # Past the cap the KL term goes on linearly (its tangent there): d/dlp = e^cap - 1 on sampled tokens, not 0.
    on = (inputs["sampled_mask"] != 0) & (mask > 0)
    np.testing.assert_allclose(grad[on], np.exp(losses.LOG_RATIO_CAP) - 1, rtol=1e-5)
    assert not grad[~on].any()


def test_per_token_clip_inputs_override_config():
    lp, inputs, mask = make_batch(seed=7)
    per_token = dict(inputs, clip_low_threshold=np.full_like(mask, 0.9), clip_high_threshold=np.full_like(mask, 1.1))
    got = run_jax("ppo", lp, per_token, mask, losses.resolve_config("ppo", None))
    want = run_jax("ppo", lp, inputs, mask, losses.resolve_config("ppo", CUSTOM["ppo"]))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


# ---- padding with garbage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_top_k", *RL_NAMES])
def test_garbage_in_padding_contributes_nothing(name):
    top_k = name == "cross_entropy_top_k"
    name = "cross_entropy" if top_k else name
    lp, inputs, mask = make_batch(seed=8, top_k=top_k)
    cfg = losses.resolve_config(name, None)
    clean = run_jax(name, lp, inputs, mask, cfg)

    garbage = np.array([np.nan, np.inf, -np.inf, 3e38], np.float32)
    pad = mask == 0

    def poison(a):
        a = a.copy()
        a[pad] = np.resize(garbage, a[pad].shape)
        return a

    dirty_inputs = {k: poison(v) for k, v in inputs.items()}
    dirty = run_jax(name, poison(lp), dirty_inputs, mask, cfg)
    assert np.isfinite(dirty[0]) and np.all(np.isfinite(dirty[1]))
    assert dirty[0] == clean[0] and dirty[2] == clean[2]
    np.testing.assert_array_equal(dirty[1], clean[1])
    assert np.all(dirty[1][pad] == 0.0)


def test_all_padding_batch_is_zero():
    lp, inputs, mask = make_batch(seed=9)
    for name in ["cross_entropy", *RL_NAMES]:
        loss, grad, _ = run_jax(name, lp, inputs, np.zeros_like(mask), losses.resolve_config(name, None))
        assert loss == 0.0 and not grad.any()


# ---- registry, config defaults and errors -----------------------------------------------------------------


def test_registry_covers_the_sdk_losses():
    from tinker.types import LossFnType

    assert set(losses.LOSSES) == set(typing.get_args(LossFnType)) - {"custom"}
    for name, spec in losses.LOSSES.items():
        assert spec.name == name
    assert losses.get_loss("cross_entropy").required_inputs == ()
    for name in RL_NAMES:
        assert losses.get_loss(name).required_inputs[:2] == ("logprobs", "advantages")
    assert losses.get_loss("stable_reinforce").required_inputs == ("logprobs", "advantages", "sampled_mask")
    assert "sequence_ratio_mask" in losses.get_loss("gspo").optional_inputs
    assert "weights" in losses.get_loss("cross_entropy").optional_inputs


def test_config_defaults():
    assert losses.resolve_config("cross_entropy", None) == {}
    assert losses.resolve_config("importance_sampling", {}) == {}
    assert losses.resolve_config("ppo", None) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert losses.resolve_config("cispo", None) == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    assert losses.resolve_config("gspo", None) == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert losses.resolve_config("dro", None) == {"beta": 0.05}
    # partial override merges; numbers sent as text (loss_fn_config_v2) are accepted
    assert losses.resolve_config("ppo", {"clip_high_threshold": "1.5"}) == {
        "clip_low_threshold": 0.8,
        "clip_high_threshold": 1.5,
    }
    assert losses.validate("dro", {"beta": 1}) == {"beta": 1.0}
    assert losses.resolve_config("stable_reinforce", {"kl_coeff": "0.01"}) == {"clip_high_threshold": 2.0,
                                                                              "kl_coeff": 0.01}


def test_unknown_loss_names_it_and_lists_supported():
    with pytest.raises(ValueError, match="'nope'") as err:
        losses.get_loss("nope")
    assert all(name in str(err.value) for name in losses.LOSSES)
    with pytest.raises(ValueError, match="'custom'"):  # forward_backward_custom runs on the client
        losses.resolve_config("custom", None)


@pytest.mark.parametrize(
    "name, config, match",
    [
        ("ppo", {"clip_low": 0.9}, "clip_low"),
        ("cross_entropy", {"beta": 0.1}, "beta"),
        ("importance_sampling", {"clip_low_threshold": 0.9}, "clip_low_threshold"),
        ("dro", {"beta": 0.1, "gamma": 1.0}, "gamma"),
        ("dro", {"beta": "abc"}, "beta"),
        ("dro", {"beta": float("nan")}, "beta"),
        ("ppo", {"clip_low_threshold": 1.3}, "clip_low_threshold"),
        ("stable_reinforce", {"kl_coeff": -0.1}, "kl_coeff"),
        ("stable_reinforce", {"clip_high_threshold": 0}, "clip_high_threshold"),
        ("stable_reinforce", {"clip_low_threshold": 0.5}, "clip_low_threshold"),
    ],
)
def test_bad_config_raises(name, config, match):
    with pytest.raises(ValueError, match=match):
        losses.resolve_config(name, config)
