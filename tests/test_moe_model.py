"""Qwen3-MoE end to end on tiny-qwen3-moe (8 experts, 2 a token), fp32 CPU: the sampler against transformers'
generate and against the decoder's own forward, with per-expert adapters sampling like the same adapters merged
into every expert's weights. (Model parity: test_parity; sharding: test_sharding; training many runs at once:
test_multitenant; export: test_convert.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tinker import types

import models_util as mu
from tinker_jax.hf.weights import load_decoder
from tinker_jax.models import lora as lora_math
from tinker_jax.models.lora import Adapter, LoraSpec
from tinker_jax.sampling import Sampler, WeightSnapshot, snapshot_of

PRESET = "tiny-qwen3-moe"


@pytest.fixture(scope="module")
def snap():
    return snapshot_of(load_decoder(mu.tiny_model_dir(PRESET)), name="base")


@pytest.fixture(scope="module")
def sampler(snap):
    eos = snap.cfg.eos_token_id
    s = Sampler(snap.cfg, [eos], max_batch=4, max_seq_len=64, prefill_lengths=(16,), prefill_batches=(4,),
                decode_steps=4, max_num_samples=2)
    s.start()
    yield s
    s.stop()


def _hf_logprobs(tokens) -> np.ndarray:
    with torch.no_grad():
        logits = mu.hf_model(PRESET)(torch.tensor([tokens])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def test_greedy_and_logprobs_match_transformers(sampler, snap):
    hf = mu.hf_model(PRESET)
    for seed, n in ((0, 5), (1, 11)):
        prompt = np.random.default_rng(seed).integers(3, 500, n).tolist()
        seq = sampler.sample(snap, prompt, types.SamplingParams(max_tokens=12, temperature=0.0)).sequences[0]
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=-1,
                          pad_token_id=0, attention_mask=torch.ones(1, n, dtype=torch.long))[0, n:].tolist()
        assert seq.tokens == ref[:len(seq.tokens)] and len(seq.tokens) >= 1
        lp = _hf_logprobs(prompt + seq.tokens)
        np.testing.assert_allclose(seq.logprobs, [lp[n - 1 + i, t] for i, t in enumerate(seq.tokens)], atol=1e-4)


def test_per_expert_adapter_samples_like_merged_experts(sampler, snap):
    """A random adapter on every projection, each expert its own: sampled tokens and logprobs equal the base model
    with every adapter merged into its weight (W_e + scale * A_e @ B_e), and differ from the base model's."""
    spec = LoraSpec(rank=2)
    rng = np.random.default_rng(3)
    shapes = lora_math.targeted(lora_math.shapes(snap.cfg, spec.rank), spec)
    adapters = {n: {k: jnp.asarray(rng.normal(0, 0.3, s), jnp.float32) for k, s in w.items()} for n, w in
                shapes.items()}
    assert adapters["gate"]["a"].shape == (2, 8, 64, 2)  # [L, E, D, R]: one adapter per expert
    merged = nnx.to_pure_dict(snap.params)
    merged = jax.tree.map(lambda x: x, merged)
    for n in "qkvo":
        merged["blocks"]["attn"][n]["kernel"] += spec.scale * (adapters[n]["a"] @ adapters[n]["b"])
    for n in ("gate", "up", "down"):
        merged["blocks"]["mlp"][n] += spec.scale * (adapters[n]["a"] @ adapters[n]["b"])
    merged["lm_head"]["kernel"] += spec.scale * (adapters["unembed"]["a"] @ adapters["unembed"]["b"])
    full = jax.tree.map(lambda x: x, snap.params)
    full.replace_by_pure_dict(merged)
    lora = WeightSnapshot(snap.cfg, snap.graphdef, snap.params, Adapter(spec, adapters), name="lora")
    plain = WeightSnapshot(snap.cfg, snap.graphdef, full, name="merged")

    prompt = [5, 17, 99, 3, 250, 41, 7]
    params = types.SamplingParams(max_tokens=8, seed=4, temperature=1.0)
    a = sampler.sample(lora, prompt, params, include_prompt_logprobs=True)
    b = sampler.sample(plain, prompt, params, include_prompt_logprobs=True)
    base = sampler.sample(snap, prompt, params).sequences[0]
    assert a.sequences[0].tokens == b.sequences[0].tokens != base.tokens
    np.testing.assert_allclose(a.sequences[0].logprobs, b.sequences[0].logprobs, rtol=2e-5, atol=1e-4)
    np.testing.assert_allclose(a.prompt_logprobs[1:], b.prompt_logprobs[1:], rtol=2e-5, atol=1e-4)


def test_fused_expert_layout_and_transformers5_config_load_the_same_model(tmp_path):
    """Newer checkpoints fuse each layer's experts (gate_up_proj [E, 2I, D], gate first; down_proj [E, D, I]) and
    transformers 5 writes `num_local_experts` and `rope_parameters`: the same weights load to the same model."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    src = mu.tiny_model_dir(PRESET)
    dst = tmp_path / "fused"
    shutil.copytree(src, dst)
    hub = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    E = cfg["num_experts"]
    fused = {k: v for k, v in hub.items() if ".mlp.experts." not in k}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts"
        fused[f"{p}.gate_up_proj"] = np.stack([np.concatenate([hub[f"{p}.{e}.gate_proj.weight"],
                                                               hub[f"{p}.{e}.up_proj.weight"]]) for e in range(E)])
        fused[f"{p}.down_proj"] = np.stack([hub[f"{p}.{e}.down_proj.weight"] for e in range(E)])
    (dst / "model.safetensors").unlink()
    save_file(fused, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg["num_local_experts"] = cfg.pop("num_experts")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    cfg.pop("rope_scaling")
    (dst / "config.json").write_text(json.dumps(cfg))

    want = nnx.to_pure_dict(nnx.state(mu.jax_model(PRESET), nnx.Param))
    got = nnx.to_pure_dict(nnx.state(load_decoder(dst), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    from tinker_jax.models import sharding
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2, tensor=2))
    placed = load_decoder(dst, shardings_fn=lambda st: sharding.state_shardings(st, mesh))  # block reads
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(placed, nnx.Param)), want)


@pytest.mark.parametrize("key,value", [("shared_expert_intermediate_size", 64), ("mlp_only_layers", [2]),
                                       ("mlp_only_layers", [0, 1]), ("decoder_sparse_step", 0),
                                       ("decoder_sparse_step", 3), ("num_experts_per_tok", 9)])
def test_unsupported_moe_variants_are_refused_naming_the_key(tmp_path, key, value):
    import json

    from tinker_jax.hf.presets import get_preset
    from tinker_jax.models.config import ConfigError, load_config

    cfg = {**get_preset(PRESET), key: value}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=key):
        load_config(tmp_path)


def test_lora_sft_halves_the_nll_and_samples_with_forward_logprobs(tmp_path):
    """Through the in-process client, on tiny-qwen3-moe-mixed (layers 0, 2, 4, 5 dense, 1 and 3 MoE): the first
    step's loss and router metric equal transformers' NLL and aux_loss (router logits of the MoE layers only); LoRA
    (attention, every expert, the dense layers' mlp, unembed) halves the training NLL of a fixed small dataset, and
    the trained weights' sampled logprobs equal the forward pass's logprobs of those tokens. (The all-MoE preset
    trains through the engine in test_engine_on_an_expert_axis_trains_like_one_device and test_multitenant.)"""
    import tinker_jax
    from tinker_jax.config import EngineConfig

    preset = "tiny-qwen3-moe-mixed"
    rng = np.random.default_rng(5)
    rows = [rng.integers(3, 500, n + 1) for n in (9, 12, 15, 7)]
    data = _next_token_data(rows)
    n_tokens = sum(len(r) - 1 for r in rows)
    hf = mu.hf_model(preset)
    want_nll = 0.0
    with torch.no_grad():
        for r in rows:
            lp = torch.log_softmax(hf(torch.tensor([r[:-1].tolist()])).logits[0].double(), -1)
            want_nll -= float(lp[torch.arange(len(r) - 1), torch.as_tensor(r[1:])].sum())
    config = EngineConfig(data_dir=tmp_path, models={"moe": str(mu.tiny_model_dir(preset))}, compile_cache=False)
    with tinker_jax.ServiceClient(config=config) as svc:
        tc = svc.create_lora_training_client("moe", rank=8, seed=0)
        nll = []
        for _ in range(25):
            out = tc.forward_backward(data, "cross_entropy").result()
            nll.append(out.metrics["loss:sum"] / n_tokens)
            if len(nll) == 1:  # untrained adapter (a no-op): the base model's numbers, as transformers has them
                assert out.metrics["loss:sum"] == pytest.approx(want_nll, rel=1e-5)
                assert out.metrics["router_aux_loss:mean"] == pytest.approx(_hf_aux_loss(rows, preset), rel=1e-5)
            if nll[-1] <= 0.5 * nll[0]:
                break
            tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
        assert nll[-1] <= 0.5 * nll[0], nll

        _assert_samples_with_forward_logprobs(tc, rows[0][:6].tolist())


def _next_token_data(rows) -> list:
    """Each row (token ids) as a cross-entropy Datum: its tokens but the last, predicting the next."""
    return [types.Datum(model_input=types.ModelInput.from_ints(r[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(r[1:].astype(np.int64))})
            for r in rows]


def _assert_samples_with_forward_logprobs(tc, prompt: list[int]) -> None:
    """The training client's current weights sample a continuation of `prompt` whose logprobs equal the forward
    pass's logprobs of the same tokens."""
    sampler = tc.save_weights_and_get_sampling_client()
    seq = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                         types.SamplingParams(max_tokens=6, seed=2)).result().sequences[0]
    full = prompt + seq.tokens
    fwd = tc.forward([types.Datum(model_input=types.ModelInput.from_ints(full[:-1]), loss_fn_inputs={
        "target_tokens": types.TensorData.from_numpy(np.asarray(full[1:], np.int64))})], "cross_entropy").result()
    lp = fwd.loss_fn_outputs[0]["logprobs"].to_numpy()[len(prompt) - 1:]
    np.testing.assert_allclose(seq.logprobs, lp, rtol=1e-5, atol=1e-5)


def _hf_aux_loss(rows, preset: str = PRESET) -> float:
    """transformers' load-balancing loss (`aux_loss`, router logits of every MoE layer, padding masked) of these rows'
    inputs, right-padded into one batch."""
    hf = mu.hf_model(preset)
    n = max(len(r) - 1 for r in rows)
    ids = torch.zeros((len(rows), n), dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r) - 1], mask[i, :len(r) - 1] = torch.as_tensor(r[:-1]), 1
    with torch.no_grad():
        return float(hf(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss)


def test_engine_on_an_expert_axis_trains_like_one_device(tmp_path):
    """The engine on expert=2 x fsdp=2 x tensor=2 (experts split over `expert`, the grouped matmul then ragged_dot,
    which XLA partitions by expert) gives one device's loss, gradient step and logprobs."""
    import tinker_jax
    from tinker_jax.config import EngineConfig
    from tinker_jax.models.sharding import MeshConfig

    rng = np.random.default_rng(9)
    rows = [rng.integers(3, 500, n + 1) for n in (11, 6)]
    data = _next_token_data(rows)
    out = {}
    for name, mesh in (("one", MeshConfig()), ("ep", MeshConfig(expert=2, fsdp=2, tensor=2))):
        config = EngineConfig(data_dir=tmp_path / name, models={"moe": str(mu.tiny_model_dir(PRESET))},
                              compile_cache=False, mesh=mesh)
        with tinker_jax.ServiceClient(config=config) as svc:
            tc = svc.create_lora_training_client("moe", rank=4, seed=1)
            first = tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            after = tc.forward(data, "cross_entropy").result()
            worker = svc.engine._workers["moe"]
            impl = nnx.merge(worker.graphdef.value, worker.base).blocks.mlp.impl  # of the decoder the engine built
            out[name] = (first.metrics, [o["logprobs"].to_numpy() for o in after.loss_fn_outputs], impl)
    assert (out["ep"][2], out["one"][2]) == ("ragged", "auto")  # the grouped matmul each mesh gets
    for k in ("loss:sum", "router_aux_loss:mean"):
        assert out["ep"][0][k] == pytest.approx(out["one"][0][k], rel=1e-5), k
    for a, b in zip(out["ep"][1], out["one"][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_adapters_of_one_rank_on_two_models_in_one_process():
    """One process serving two models (an engine of several base models): sampler kernels built for one model's
    adapter table or KV pool are not reused for another's (a MoE model with dense layers has a table with leaves
    for them, dense_a and dense_b, a dense model's has not; kv heads may split over a mesh differently). After a
    sampler of tiny-qwen3-moe-mixed loaded a rank-2 adapter, one of tiny-qwen3 loads a rank-2 adapter too and
    samples like its weights with the adapter merged."""
    prompt = [5, 17, 99, 3, 250, 41, 7]
    params = types.SamplingParams(max_tokens=4, seed=4, temperature=1.0)

    def sampler_of(snap) -> Sampler:
        return Sampler(snap.cfg, [snap.cfg.eos_token_id], max_batch=4, max_seq_len=64, prefill_lengths=(16,),
                       prefill_batches=(4,), decode_steps=4)

    mixed = snapshot_of(load_decoder(mu.tiny_model_dir("tiny-qwen3-moe-mixed")), name="mixed")
    spec = LoraSpec(rank=2)
    zeros = {n: {k: jnp.zeros(sh, jnp.float32) for k, sh in w.items()}
             for n, w in lora_math.targeted(lora_math.shapes(mixed.cfg, 2), spec).items()}
    assert "dense_a" in zeros["gate"]
    s = sampler_of(mixed).start()
    try:
        s.sample(WeightSnapshot(mixed.cfg, mixed.graphdef, mixed.params, Adapter(spec, zeros)), prompt, params)
    finally:
        s.stop()

    dense = snapshot_of(load_decoder(mu.tiny_model_dir("tiny-qwen3")), name="dense")
    spec = LoraSpec(rank=2, targets=("q",))
    rng = np.random.default_rng(5)
    ab = {k: jnp.asarray(rng.normal(0, 0.3, sh), jnp.float32)
          for k, sh in lora_math.targeted(lora_math.shapes(dense.cfg, 2), spec)["q"].items()}
    merged = jax.tree.map(lambda x: x, nnx.to_pure_dict(dense.params))
    merged["blocks"]["attn"]["q"]["kernel"] += spec.scale * (ab["a"] @ ab["b"])
    full = jax.tree.map(lambda x: x, dense.params)
    full.replace_by_pure_dict(merged)
    s = sampler_of(dense).start()
    try:
        a = s.sample(WeightSnapshot(dense.cfg, dense.graphdef, dense.params, Adapter(spec, {"q": ab})), prompt,
                     params).sequences[0]
        b = s.sample(WeightSnapshot(dense.cfg, dense.graphdef, full), prompt, params).sequences[0]
    finally:
        s.stop()
    assert a.tokens == b.tokens
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=2e-5, atol=1e-4)
