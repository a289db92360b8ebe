"""The MoE feed-forward (tinker_jax.models.moe) against transformers' Qwen3-MoE block, fp32: outputs, router logits,
gradients (input, router, every expert) and the load-balancing loss, on a router stressed so that routing is
decisive (top-k margins far above float error) and every expert gets tokens; with and without norm_topk_prob.
Odd sizes so that shape bugs show."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

from models_util import rel_err
from tinker_jax.models import moe

D, I, E, K, N = 24, 13, 6, 2, 37  # width, expert width, experts, experts per token, tokens


def _pair(norm_topk_prob: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    router = rng.normal(0, 1.5, (D, E)).astype(np.float32)  # large logits: decisive routing
    gate, up = (rng.normal(0, 0.2, (E, D, I)).astype(np.float32) for _ in range(2))
    down = rng.normal(0, 0.2, (E, I, D)).astype(np.float32)
    x = rng.normal(0, 1.0, (1, N, D)).astype(np.float32)
    cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                         norm_topk_prob=norm_topk_prob, hidden_act="silu")
    block = hf.Qwen3MoeSparseMoeBlock(cfg).float()
    with torch.no_grad():  # transformers: router [E,D]; gate_up [E, 2I, D] with gate first; down [E, D, I]
        block.gate.weight.copy_(torch.from_numpy(router.T))
        block.experts.gate_up_proj.copy_(torch.from_numpy(np.concatenate([gate, up], axis=2).transpose(0, 2, 1)))
        block.experts.down_proj.copy_(torch.from_numpy(down.transpose(0, 2, 1)))
    ours = moe.MoeMLP(D, I, E, K, norm_topk_prob, rngs=nnx.Rngs(0))
    ours.router[...], ours.gate[...], ours.up[...], ours.down[...] = map(jnp.asarray, (router, gate, up, down))
    return block, ours, x


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_block_matches_transformers(norm_topk_prob):
    block, ours, x = _pair(norm_topk_prob)
    xt = torch.from_numpy(x).requires_grad_(True)
    want = block(xt)
    want_logits = torch.nn.functional.linear(xt.reshape(-1, D), block.gate.weight)
    probs = torch.softmax(want_logits, -1)
    top = torch.topk(want_logits, K + 1, dim=-1).values
    assert float((top[:, K - 1] - top[:, K]).min()) > 1e-3  # decisive: no near-tie at the k-th choice
    assert len(set(torch.topk(probs, K, dim=-1).indices.flatten().tolist())) == E  # every expert has tokens

    got, logits = ours.forward(jnp.asarray(x))
    assert rel_err(got, want.detach().numpy()) < 1e-5
    assert rel_err(logits, want_logits.detach().numpy()) < 1e-5

    # Gradients of one scalar of the output, w.r.t. the input and every weight.
    proj = np.random.default_rng(1).normal(0, 1, x.shape).astype(np.float32)
    (want * torch.from_numpy(proj)).sum().backward()
    graphdef, params = nnx.split(ours, nnx.Param)

    def loss(p, xj):
        y = nnx.merge(graphdef, p)(xj)
        return jnp.sum(y * proj)

    gp, gx = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    assert rel_err(gx, xt.grad.numpy()) < 1e-4
    assert rel_err(gp["router"][...], block.gate.weight.grad.numpy().T) < 1e-4
    gate_up = block.experts.gate_up_proj.grad.numpy().transpose(0, 2, 1)  # [E, D, 2I]
    assert rel_err(gp["gate"][...], gate_up[..., :I]) < 1e-4
    assert rel_err(gp["up"][...], gate_up[..., I:]) < 1e-4
    assert rel_err(gp["down"][...], block.experts.down_proj.grad.numpy().transpose(0, 2, 1)) < 1e-4


def test_load_balancing_loss_matches_transformers():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2.0, (3, N, E)).astype(np.float32)  # three MoE layers
    mask = (rng.random(N) > 0.2).astype(np.float32)
    for m in (None, mask):
        want = hf.load_balancing_loss_func(tuple(torch.from_numpy(lg) for lg in logits), E, K,
                                           None if m is None else torch.from_numpy(m).reshape(1, N))
        got = moe.load_balancing_loss(jnp.asarray(logits), K, None if m is None else jnp.asarray(m))
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_dropless_grouped_matmul_equals_a_dense_loop():
    """Independent of transformers: every token's output is the weighted sum over its k experts, computed one
    token and one expert at a time in numpy (bf16 compute keeps its dtype)."""
    _, ours, x = _pair(True, seed=5)
    x2 = x.reshape(N, D)
    logits, w, idx = moe.route(jnp.asarray(x2), ours.router[...], K, True)
    got = moe.experts_ffn(jnp.asarray(x2), idx, w, ours.gate[...], ours.up[...], ours.down[...])
    g, u, d = (np.asarray(a) for a in (ours.gate[...], ours.up[...], ours.down[...]))
    want = np.zeros_like(x2)
    for n in range(N):
        for j in range(K):
            e = int(idx[n, j])
            h = x2[n] @ g[e]
            want[n] += float(w[n, j]) * (((h / (1 + np.exp(-h))) * (x2[n] @ u[e])) @ d[e])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    low = moe.experts_ffn(jnp.asarray(x2, jnp.bfloat16), idx, w.astype(jnp.bfloat16), ours.gate[...],
                          ours.up[...], ours.down[...])
    assert low.dtype == jnp.bfloat16 and rel_err(low.astype(jnp.float32), want) < 3e-2


@pytest.mark.parametrize("mode", ["uniform", "gather"])
def test_per_expert_lora_equals_merged_weights(mode):
    """Each batch row's tokens go through its own run's adapters, one per expert: equal to a numpy loop over tokens
    with W_e + scale * A_e @ B_e merged for the row's slot. Rows outside the adapters' segment, and slot 0 (the
    null adapter), get the base experts."""
    from tinker_jax.models import lora as lora_math

    rows, T, R, S = 4, 5, 3, 3  # batch rows, tokens per row, rank, slots (slot 0: null)
    _, ours, _ = _pair(True, seed=7)
    rng = np.random.default_rng(11)
    x2 = rng.normal(0, 1.0, (rows * T, D)).astype(np.float32)
    dims = {"gate": (D, I), "up": (D, I), "down": (I, D)}
    weights = {n: {"a": rng.normal(0, 0.3, (S, E, i, R)).astype(np.float32),
                   "b": rng.normal(0, 0.3, (S, E, R, o)).astype(np.float32)} for n, (i, o) in dims.items()}
    for w in weights.values():
        w["b"][0] = 0.0
    scale = np.zeros((S, len(lora_math.NAMES)), np.float32)
    scale[1:, [lora_math.INDEX[n] for n in dims]] = [[0.5], [2.0]]
    scale[2, lora_math.INDEX["up"]] = 0.0  # slot 2's run does not adapt `up`
    if mode == "uniform":
        start, size, slots = 0, rows, [2] * rows
    else:  # row 0 has no adapter of this rank; row 2's slot index S means none either (the decode tables' padding)
        start, size, slots = 1, 3, [1, S, 0]
    lora = (lora_math.LoraRows(jax.tree.map(jnp.asarray, weights), jnp.asarray(scale), jnp.asarray(slots, jnp.int32),
                               start, size, mode),)
    _, w, idx = moe.route(jnp.asarray(x2), ours.router[...], K, True)
    got = moe.experts_ffn(jnp.asarray(x2), idx, w, ours.gate[...], ours.up[...], ours.down[...], lora, T)

    base = {"gate": np.asarray(ours.gate[...]), "up": np.asarray(ours.up[...]), "down": np.asarray(ours.down[...])}
    want = np.zeros_like(x2)
    for n in range(rows * T):
        b = n // T
        slot = slots[b - start] if start <= b < start + size else 0
        slot = 0 if slot >= S else slot  # slot 0 is the null adapter: merged == base
        merged = {p: base[p] + scale[slot, lora_math.INDEX[p]] * (weights[p]["a"][slot] @ weights[p]["b"][slot])
                  for p in dims}
        for j in range(K):
            e = int(idx[n, j])
            h = x2[n] @ merged["gate"][e]
            want[n] += float(w[n, j]) * (((h / (1 + np.exp(-h))) * (x2[n] @ merged["up"][e])) @ merged["down"][e])
    plain = np.asarray(moe.experts_ffn(jnp.asarray(x2), idx, w, ours.gate[...], ours.up[...], ours.down[...]))
    assert np.abs(want - plain).max() > 1e-2  # the adapters change the output: the comparison can fail
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("m,groups", [(37, 6), (5, 8), (64, 3)])
def test_grouped_matmul_blocked_equals_ragged_and_a_loop(m, groups):
    """The blocked grouped matmul (the CPU/GPU default) against jax.lax.ragged_dot and a numpy loop: random group
    sizes with empty groups, more groups than rows; values and gradients."""
    from tinker_jax.models.grouped import grouped_matmul

    rng = np.random.default_rng(m)
    x = rng.normal(size=(m, 7)).astype(np.float32)
    w = rng.normal(size=(groups, 7, 5)).astype(np.float32)
    sizes = np.bincount(rng.integers(0, groups, m), minlength=groups).astype(np.int32)
    sizes[0] = 0
    sizes[-1] += m - sizes.sum()
    start = np.concatenate([[0], np.cumsum(sizes)])
    want = np.concatenate([x[start[g]:start[g + 1]] @ w[g] for g in range(groups)])
    got = {impl: grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes), impl)
           for impl in ("ragged", "blocked")}
    for impl, y in got.items():
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5, err_msg=impl)
    grads = {impl: jax.grad(lambda w_, x_: jnp.sum(jnp.sin(grouped_matmul(x_, w_, jnp.asarray(sizes), impl))),
                            argnums=(0, 1))(jnp.asarray(w), jnp.asarray(x)) for impl in ("ragged", "blocked")}
    for a, b in zip(grads["ragged"], grads["blocked"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
