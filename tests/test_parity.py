"""Numerical parity of tinker_jax's Decoder with transformers (PyTorch CPU, fp32, eager attention).

For every family preset (qwen3: q/k norm + tied; llama3: llama3 rope scaling + untied; qwen2: qkv biases):
logits on a multi-row batch and on packed segments, gradients of a summed token cross-entropy w.r.t.
every base weight, KV-cache prefill + decode, a bf16 compute-mode deviation bound, and the load errors
for bad checkpoints. Measured bf16 numbers are recorded in docs/numerics.md.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import models_util as mu
from tinker_jax.models.config import SUPPORTED_ARCHITECTURES, ConfigError
from tinker_jax.models.decoder import KVCache
from tinker_jax.hf.weights import WeightsError, iter_hf_tensors, load_decoder

LOGIT_ATOL = 1e-4
GRAD_RTOL = 1e-4

families = pytest.mark.parametrize("preset", mu.PRESETS)


# ---------------------------------------------------------------------------------------------- helpers


def _jax_ce_grads_hf(model, tokens, positions, targets, weights, segment_ids=None) -> dict[str, np.ndarray]:
    """Grad of sum(weights * nll) w.r.t. every nnx.Param, under HF names in HF layout."""
    _, grads = mu.ce_grads(model, tokens, positions, targets, weights, segment_ids)
    # The grad state has the param state's structure, so the weights module's own HF mapping applies.
    graphdef, rest = mu.graphdef_rest(model)
    return dict(iter_hf_tensors(nnx.merge(graphdef, grads, rest)))


def _hf_logits(preset, tokens, positions=None) -> np.ndarray:
    hf = mu.hf_model(preset)
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long),
                 position_ids=None if positions is None else torch.as_tensor(np.asarray(positions), dtype=torch.long))
    return out.logits.numpy()


def _torch_nll_sum(hf, tokens, targets):
    logits = hf(input_ids=torch.as_tensor(np.asarray(tokens)[None], dtype=torch.long)).logits[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    return -lp.gather(-1, torch.as_tensor(np.asarray(targets), dtype=torch.long)[:, None]).sum()


# ----------------------------------------------------------------------------------------------- logits


@families
def test_logits_match_transformers_batch(preset):
    V = mu.vocab_size(preset)
    B, T = 4, 16
    tokens = mu.random_tokens(1, (B, T), V)
    positions = mu.arange_positions(B, T)
    logits, _ = mu.forward(mu.jax_model(preset), tokens, positions)
    ref = _hf_logits(preset, tokens)
    assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
    err = np.abs(np.asarray(logits) - ref).max()
    assert err <= LOGIT_ATOL, f"{preset}: max |logits - HF| = {err:.3g}"
    # Not a vacuous comparison: the rows differ and the logits are not flat.
    assert ref.std() > 0.1 and np.abs(ref[0] - ref[1]).max() > 0.1


@families
def test_logits_match_transformers_packed(preset):
    """Two sequences packed in one row (positions restart), a padded tail, and a plain second row."""
    V = mu.vocab_size(preset)
    T, la, lb = 16, 6, 7
    tokens = mu.random_tokens(2, (2, T), V)
    seg = np.zeros((2, T), np.int32)
    seg[0, :la], seg[0, la:la + lb] = 1, 2  # row 0: [A A A A A A B B B B B B B 0 0 0]
    seg[1, :] = 1
    positions = np.zeros((2, T), np.int32)
    positions[0, :la] = np.arange(la)
    positions[0, la:la + lb] = np.arange(lb)
    positions[1] = np.arange(T)
    logits, _ = mu.forward(mu.jax_model(preset), tokens, positions, seg)
    logits = np.asarray(logits)
    ref_a = _hf_logits(preset, tokens[:1, :la])[0]
    ref_b = _hf_logits(preset, tokens[:1, la:la + lb])[0]
    ref_row1 = _hf_logits(preset, tokens[1:])[0]
    for name, got, ref in (("segment A", logits[0, :la], ref_a), ("segment B", logits[0, la:la + lb], ref_b),
                           ("row 1", logits[1], ref_row1)):
        err = np.abs(got - ref).max()
        assert err <= LOGIT_ATOL, f"{preset} {name}: max |logits - HF| = {err:.3g}"
    assert np.isfinite(logits).all()  # padding rows attend nowhere but stay finite (no NaN)


# -------------------------------------------------------------------------------------------- gradients


@families
def test_ce_grads_match_torch_autograd(preset):
    """d/dW of sum_t -log p(target_t) for every base weight, a plain row plus a packed+padded row."""
    V = mu.vocab_size(preset)
    T, la, lb = 12, 5, 4
    tokens = mu.random_tokens(3, (2, T), V)
    targets = mu.random_tokens(4, (2, T), V)
    seg = np.zeros((2, T), np.int32)
    seg[0] = 1
    seg[1, :la], seg[1, la:la + lb] = 1, 2
    positions = mu.arange_positions(2, T)
    positions[1, la:la + lb] = np.arange(lb)
    positions[1, la + lb:] = 0
    weights = (seg != 0).astype(np.float32)

    got = _jax_ce_grads_hf(mu.jax_model(preset), tokens, positions, targets, weights, seg)

    hf = mu.hf_model(preset)
    hf.zero_grad(set_to_none=True)
    loss = (_torch_nll_sum(hf, tokens[0], targets[0])
            + _torch_nll_sum(hf, tokens[1, :la], targets[1, :la])
            + _torch_nll_sum(hf, tokens[1, la:la + lb], targets[1, la:la + lb]))
    loss.backward()
    ref = mu.hf_checkpoint_layout({name: p.grad.numpy() for name, p in hf.named_parameters()})
    hf.zero_grad(set_to_none=True)

    assert set(got) == set(ref), f"{preset}: names differ: {sorted(set(got) ^ set(ref))}"
    bad, unused = {}, set()
    for name, g in ref.items():
        assert got[name].shape == g.shape, f"{preset} {name}: {got[name].shape} vs {g.shape}"
        if ".experts." in name and not np.abs(g).any():  # an expert no token was routed to: zero both ways
            assert not np.abs(got[name]).any(), f"{preset} {name}: gradient for an expert no token used"
            unused.add(name)
            continue
        assert np.abs(g).max() > 0, f"{preset} {name}: zero reference gradient"
        e = mu.rel_err(got[name], g)
        if e > GRAD_RTOL:
            bad[name] = e
    assert not bad, f"{preset}: relative grad error > {GRAD_RTOL}: {bad}"
    assert len(unused) <= len(ref) // 4, f"{preset}: most experts unused, the test checks little: {sorted(unused)}"


# -------------------------------------------------------------------------------------------- KV cache


@families
def test_kv_cache_prefill_decode_matches_full_forward(preset):
    """Rows with different prompt lengths: one padded prefill call, then T=1 decode steps per row."""
    model = mu.jax_model(preset)
    V = mu.vocab_size(preset)
    B, L, S = 2, 12, 16
    prompt = np.array([3, 6])  # row 0's prefill slots 3..5 hold padding, later overwritten by decode
    tokens = mu.random_tokens(5, (B, L), V)
    full, _ = mu.forward(model, tokens, mu.arange_positions(B, L))
    full = np.asarray(full)

    P = int(prompt.max())
    cache = KVCache.init(model.cfg, B, S)
    prefill = tokens[:, :P].copy()
    for b in range(B):  # pad tokens (not the real continuation) in the slots past each row's prompt
        prefill[b, prompt[b]:] = (tokens[b, prompt[b]:P] + 1 + b) % V
    logits, cache = mu.forward(model, prefill, mu.arange_positions(B, P), None, cache)
    logits = np.asarray(logits)
    for b in range(B):
        err = np.abs(logits[b, :prompt[b]] - full[b, :prompt[b]]).max()
        assert err <= 1e-5, f"{preset} row {b} prefill: {err:.3g}"
    for step in range(L - P):
        pos = (prompt + step).astype(np.int32)[:, None]  # [B,1]: each row at its own position
        tok = np.take_along_axis(tokens, pos, axis=1)
        logits, cache = mu.forward(model, tok, pos, None, cache)
        ref = np.take_along_axis(full, pos[:, :, None], axis=1)
        err = np.abs(np.asarray(logits) - ref).max()
        assert err <= 1e-5, f"{preset} decode step {step} (positions {pos[:, 0]}): {err:.3g}"
    assert cache.k.shape == (model.cfg.n_layers, B, S, model.cfg.n_kv_heads, model.cfg.head_dim)


# ---------------------------------------------------------------------------------------- bf16 compute


def bf16_deviation(preset, bf16_model, rows=4, length=64, seed=6) -> dict[str, float]:
    """bf16 compute (and bf16 weights) vs the fp32 model on random tokens; used by docs/numerics.md."""
    V = mu.vocab_size(preset)
    tokens = mu.random_tokens(seed, (rows, length), V)
    positions = mu.arange_positions(rows, length)
    targets = np.roll(tokens, -1, axis=1)
    ref, _ = mu.forward(mu.jax_model(preset), tokens, positions)
    bf, _ = mu.forward(bf16_model, tokens, positions)
    ref, bf = np.asarray(ref), np.asarray(bf)
    nll_ref = np.asarray(mu.token_nll(jnp.asarray(ref), jnp.asarray(targets)))
    nll_bf = np.asarray(mu.token_nll(jnp.asarray(bf), jnp.asarray(targets)))
    dev = np.abs(bf - ref)
    return dict(
        logit_std=float(ref.std()), max_abs=float(dev.max()), mean_abs=float(dev.mean()),
        nll_mean_abs=float(np.abs(nll_bf - nll_ref).mean()), nll_max_abs=float(np.abs(nll_bf - nll_ref).max()),
        nll_mean_ref=float(nll_ref.mean()),
        nll_sum_rel=float(abs(nll_bf.sum() - nll_ref.sum()) / nll_ref.sum()),
        argmax_agree=float((bf.argmax(-1) == ref.argmax(-1)).mean()),
    )


@families
def test_bf16_compute_deviation_is_bounded(preset):
    m = load_decoder(mu.tiny_model_dir(preset), dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(m, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    d = bf16_deviation(preset, m)
    print(f"\n{preset} bf16 vs fp32: {d}")
    # bf16 has an 8-bit mantissa (rel. rounding 2^-9 ~ 0.2%); a few % of the logit spread is the budget.
    assert d["mean_abs"] < 0.05 * d["logit_std"], d
    if not m.cfg.is_moe:  # a MoE token whose top-k experts are near a tie can switch experts under bf16 rounding:
        assert d["max_abs"] < 0.5 * d["logit_std"], d  # a few logits move far; the means below still bound it
    assert d["nll_mean_abs"] < 0.05, d  # nats per token
    assert d["argmax_agree"] > 0.9, d


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def model_copy(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(mu.tiny_model_dir("tiny-qwen2"), dst)
    return dst


def _weights_file(d):
    files = sorted(d.glob("*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def test_missing_config_json(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json") as e:
        load_decoder(model_copy)
    assert "not found" in str(e.value)


def test_malformed_config_json(model_copy):
    (model_copy / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"], "hidden_size": ')
    with pytest.raises(ConfigError, match="malformed JSON") as e:
        load_decoder(model_copy)
    assert "config.json" in str(e.value)


def test_missing_required_config_field(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        load_decoder(model_copy)


def test_unsupported_architecture_names_supported_ones(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_decoder(model_copy)
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in msg, msg


def test_missing_weight_tensor_is_named(model_copy):
    f = _weights_file(model_copy)
    tensors = load_file(f)
    name = "model.layers.1.self_attn.k_proj.bias"
    del tensors[name]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="missing weight tensor") as e:
        load_decoder(model_copy)
    assert name in str(e.value)


def _write_wrong_shape(d):
    f = _weights_file(d)
    tensors = load_file(f)
    name = "model.layers.0.mlp.up_proj.weight"
    want = tuple(tensors[name].shape)  # HF layout [out, in] = (96, 64)
    bad = (want[0] + 8, want[1])
    tensors[name] = np.zeros(bad, tensors[name].dtype)
    save_file(tensors, f, metadata={"format": "pt"})
    return name, want, bad


def test_wrong_shape_names_tensor_and_both_shapes(model_copy):
    name, want, bad = _write_wrong_shape(model_copy)
    with pytest.raises(WeightsError) as e:
        load_decoder(model_copy)
    msg = str(e.value)
    assert name in msg and str(want) in msg, msg
    assert str(bad) in msg or str(bad[::-1]) in msg, msg


def test_wrong_shape_reports_both_shapes_in_file_layout(model_copy):
    name, want, bad = _write_wrong_shape(model_copy)
    with pytest.raises(WeightsError) as e:
        load_decoder(model_copy)
    assert f"has shape {bad}, expected {want}" in str(e.value), str(e.value)
