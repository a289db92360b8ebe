"""Dimuon (training.optim.dimuon): the update against an independent NumPy reference, its checks, and a LoRA run
through the in-process ServiceClient that lowers its loss, resumes bitwise from a checkpoint and refuses mixed-up
optimizer parameters."""

from __future__ import annotations

import math

import jax.numpy as jnp
import models_util
import numpy as np
import pytest
import tinker.types as tt
from models_util import flat

import tinker_jax
from tinker_jax.config import EngineConfig
from tinker_jax.errors import UserError
from tinker_jax.training import optim

RANK = 4


def ref_msign(x: np.ndarray) -> np.ndarray:
    """Muon's quintic Newton-Schulz, float64, one matrix at a time."""
    a, b, c = optim.DIMUON_NS_COEFFS
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-2]):
        m = x[idx]
        wide = m.shape[0] > m.shape[1]
        m = m.T if wide else m
        m = m / (np.linalg.norm(m) + optim.DIMUON_EPS)
        for _ in range(optim.DIMUON_NS_STEPS):
            g = m @ m.T
            m = a * m + (b * g + c * g @ g) @ m
        out[idx] = m.T if wide else m
    return out


def ref_dimuon(params: dict, grads: dict, mu: dict, hp: optim.DimuonHP, rank: int):
    """The documented update (training/optim.py's notes), written out in NumPy float64."""
    gnorm = math.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
    factor = hp.grad_clip_norm / gnorm if 0 < hp.grad_clip_norm < gnorm else 1.0
    lr = hp.learning_rate * (32 / rank) ** hp.rank_lr_correction_exponent
    new_p, new_m = {}, {}
    for k in params:
        m = hp.beta1 * mu[k] + (1 - hp.beta1) * grads[k] * factor
        n = m / (np.sqrt(np.mean(np.square(m), axis=(-2, -1), keepdims=True)) + optim.DIMUON_EPS)
        pre = n / ((np.mean(n * n, axis=-1, keepdims=True) + hp.damping) ** 0.25
                   * (np.mean(n * n, axis=-2, keepdims=True) + hp.damping) ** 0.25)
        o = ref_msign(pre)
        o = o * math.sqrt(rank) / (np.linalg.norm(o, axis=(-2, -1), keepdims=True) + optim.DIMUON_EPS)
        new_p[k], new_m[k] = params[k] - lr * o, m
    return new_p, new_m, gnorm


def test_dimuon_update_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    shapes = {"a": (2, 24, RANK), "b": (2, RANK, 40), "expert_a": (2, 3, 16, RANK), "unembed_b": (RANK, 64)}
    p = {k: rng.normal(0, 0.1, s) for k, s in shapes.items()}
    m = {k: np.zeros(s) for k, s in shapes.items()}
    jp = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    jm = {k: jnp.asarray(v, jnp.float32) for k, v in m.items()}
    count = jnp.int32(0)
    hps = [optim.DimuonHP(0.02), optim.DimuonHP(0.01, beta1=0.5, grad_clip_norm=1.0, damping=0.5),
           optim.DimuonHP(0.03, rank_lr_correction_exponent=0.5)]
    for hp in hps:
        g = {k: rng.normal(0, 1.0, s) for k, s in shapes.items()}
        g["b"][1] = 0.0  # a layer that never has a gradient (so no momentum) is never moved
        before = {k: np.asarray(v, np.float64) for k, v in jp.items()}
        p, m, gnorm = ref_dimuon(before, g, {k: np.asarray(v, np.float64) for k, v in jm.items()}, hp, RANK)
        jp, jm, count, jnorm = optim.dimuon(jp, {k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, jm, count,
                                            jnp.asarray(hp.array()), RANK)
        np.testing.assert_allclose(float(jnorm), gnorm, rtol=1e-5)
        for k in shapes:
            np.testing.assert_allclose(np.asarray(jm[k]), m[k], rtol=1e-5, atol=1e-6, err_msg=k)
            np.testing.assert_allclose(np.asarray(jp[k]), p[k], rtol=1e-4, atol=2e-6, err_msg=k)
            # Each matrix moved by learning_rate (rank-corrected) along a direction of Frobenius norm sqrt(rank).
            moved = np.linalg.norm(np.asarray(jp[k], np.float64) - before[k], axis=(-2, -1))
            lr = hp.learning_rate * (32 / RANK) ** hp.rank_lr_correction_exponent
            want = np.full(moved.shape, lr * math.sqrt(RANK))
            if k == "b":
                want[1] = 0.0
            np.testing.assert_allclose(moved, want, rtol=1e-4, atol=1e-7, err_msg=k)
    assert int(count) == 3


@pytest.mark.parametrize("values, words", [
    ({}, "optimizer_params.learning_rate: required"),
    ({"learning_rate": -1.0}, "learning_rate: must be >= 0"),
    ({"learning_rate": 0.1, "beta1": 1.0}, "beta1: must be < 1"),
    ({"learning_rate": 0.1, "damping": 0.0}, "damping: must be > 0"),
    ({"learning_rate": float("nan")}, "learning_rate: must be a finite number"),
])
def test_dimuon_params_are_checked(values, words):
    with pytest.raises(UserError, match=words):
        optim.check_dimuon(values)


def test_optimizer_kinds():
    assert optim.optimizer_kind(None) == optim.optimizer_kind({"type": "adam"}) == "adamw"
    assert optim.optimizer_kind(tt.DimuonOptimizerConfig()) == "dimuon"
    with pytest.raises(UserError, match="optimizer_config.type: unknown optimizer 'sgd'"):
        optim.optimizer_kind({"type": "sgd"})
    with pytest.raises(UserError, match="optimizer_config.version: Dimuon version 2"):
        optim.optimizer_kind({"type": "dimuon", "version": 2})
    assert isinstance(optim.check_optim_params(tt.DimuonParams(learning_rate=0.1)), optim.DimuonHP)
    assert isinstance(optim.check_optim_params({"learning_rate": 0.1}), optim.AdamHP)


def _data(step: int) -> list[tt.Datum]:
    rng = np.random.default_rng(50 + step % 2)  # two batches, alternating: the loss must fall on both
    out = []
    for n in (6, 11):
        toks = rng.integers(0, 512, n + 1)
        out.append(tt.Datum(model_input=tt.ModelInput.from_ints(toks[:-1].tolist()),
                            loss_fn_inputs={"target_tokens": tt.TensorData.from_numpy(toks[1:].astype(np.int64))}))
    return out


DIMUON = tt.DimuonParams(learning_rate=0.02, grad_clip_norm=10.0)


def _step(tc, step: int) -> float:
    loss = tc.forward_backward(_data(step), "cross_entropy").result().metrics["loss:sum"]
    out = tc.optim_step(DIMUON).result()
    assert out.metrics["learning_rate:mean"] == pytest.approx(0.02)
    return loss


def test_dimuon_lora_run_lowers_loss_resumes_bitwise_and_refuses_mixups(tmp_path):
    model_dir = models_util.tiny_model_dir("tiny-qwen3")
    with tinker_jax.ServiceClient(config=EngineConfig(data_dir=tmp_path, models={"tiny": str(model_dir)},
                                                      compile_cache=False)) as svc:
        tc = svc.create_lora_training_client("tiny", rank=RANK, seed=0, optimizer=tt.DimuonOptimizerConfig())
        assert tc.get_info().optimizer_config.type == "dimuon"
        losses = []
        for step in range(6):
            losses.append(_step(tc, step))
            if step == 3:
                path = tc.save_state("s4").result().path
        assert losses[4] < losses[0] * 0.9 and losses[5] < losses[1] * 0.9  # both batches fell
        final = flat(tc.engine.run_state(tc.model_id)["weights"])
        st = tc.engine.run_state(tc.model_id)
        assert not any(np.any(x) for x in flat(st["nu"]).values())  # Adam's second moment stays unused

        resumed = svc.create_training_client_from_state_with_optimizer(path)
        assert resumed.get_info().optimizer_config.type == "dimuon"
        assert [_step(resumed, step) for step in (4, 5)] == losses[4:]  # bitwise
        got = flat(resumed.engine.run_state(resumed.model_id)["weights"])
        for k in final:
            np.testing.assert_array_equal(got[k], final[k], err_msg=k)

        with pytest.raises(UserError, match="created with the dimuon optimizer; pass DimuonParams"):
            tc.optim_step(tt.AdamParams(learning_rate=1e-3)).result()
        adam = svc.create_lora_training_client("tiny", rank=RANK, seed=0)
        assert adam.get_info().optimizer_config.type == "adamw"
        with pytest.raises(UserError, match="created with the adamw optimizer; pass AdamParams"):
            adam.optim_step(DIMUON).result()
        with pytest.raises(UserError, match="holds dimuon optimizer state; this model trains with adamw"):
            adam.load_state_with_optimizer(path).result()
        adam.load_state(path).result()  # the weights alone are fine
        with pytest.raises(UserError, match="offered for LoRA runs only"):
            svc.engine.create_model("tiny", full_finetune=True, optimizer={"type": "dimuon"}).result()
        # From a checkpoint: another optimizer only with a fresh state of it.
        adam_path = adam.save_state("adam").result().path
        switched = svc.create_training_client_from_state(adam_path, optimizer=tt.DimuonOptimizerConfig())
        assert switched.get_info().optimizer_config.type == "dimuon"
        with pytest.raises(UserError, match="holds adamw optimizer state"):
            svc.engine.create_model_from_state(adam_path, True, optimizer_config={"type": "dimuon"}).result()
