"""Export to HF (merged) and PEFT, and PEFT back in: logits must match transformers / peft within 1e-4."""

import dataclasses
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tinker_jax.hf.convert import (ConvertError, export_merged_hf, export_peft_adapter,  # noqa: E402
                                   load_peft_adapter, lora_spec_from_peft)
from tinker_jax.hf.weights import load_decoder  # noqa: E402
from tinker_jax.models import lora as lora_math  # noqa: E402
from tinker_jax.models.lora import Adapter, LoraSpec  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=96)
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _configs():
    return {
        "qwen3_tied": transformers.Qwen3Config(**TINY, tie_word_embeddings=True),
        "qwen2": transformers.Qwen2Config(**TINY, tie_word_embeddings=False),
        "llama3_rope": transformers.LlamaConfig(
            **TINY, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}),
        "qwen3_moe": transformers.Qwen3MoeConfig(**TINY, tie_word_embeddings=False, num_experts=4,
                                                 num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
        # layers 0, 2 dense (decoder_sparse_step 2) and 3 (mlp_only_layers): a second stack of layers
        "qwen3_moe_mixed": transformers.Qwen3MoeConfig(
            **{**TINY, "num_hidden_layers": 4}, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, decoder_sparse_step=2, mlp_only_layers=[3]),
    }


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> HF directory of a tiny random model (weights std ~0.1, norms ~1, biases random)."""
    out = {}
    for i, (name, cfg) in enumerate(_configs().items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in pname else 0.0))
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        (d / "tokenizer.json").write_text('{"fake": true}')
        (d / "tokenizer_config.json").write_text("{}")
        out[name] = d
    return out


@pytest.fixture(scope="module")
def base_models(bases):
    return {name: load_decoder(d) for name, d in bases.items()}


def _adapter(cfg, spec: LoraSpec, seed: int) -> Adapter:
    """Random non-zero A and B for the projections `spec` adapts (a fresh adapter has B = 0, a no-op)."""
    rs = np.random.RandomState(seed)  # numpy: no per-shape compiles
    shapes = lora_math.targeted(lora_math.shapes(cfg, spec.rank), spec)
    return Adapter(spec, {n: {k: jnp.asarray(0.1 * rs.standard_normal(s), jnp.float32) for k, s in w.items()}
                          for n, w in shapes.items()})


TOKENS = np.random.RandomState(0).randint(0, 512, (2, 12)).astype(np.int32)
POSITIONS = np.tile(np.arange(TOKENS.shape[1], dtype=np.int32), (TOKENS.shape[0], 1))
_forward = nnx.jit(lambda model, tokens, positions, lora: model.logits(model(tokens, positions, lora=lora)[0], lora))


def _logits(model, adapter: Adapter | None = None):
    """tinker_jax logits of `model` with `adapter` on every row (jitted: one compile per structure)."""
    lora = () if adapter is None else lora_math.rows_for(adapter, TOKENS.shape[0])
    return np.asarray(_forward(model, TOKENS, POSITIONS, lora))


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def _close(a, b, atol=1e-4):
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------- merged export


@pytest.mark.parametrize("family,shard_bytes", [("qwen3_tied", None), ("qwen2", None), ("llama3_rope", 60_000),
                                               ("qwen3_moe", None), ("qwen3_moe_mixed", None)])
def test_export_merged_matches_transformers(bases, base_models, tmp_path, family, shard_bytes):
    model = base_models[family]
    adapter = _adapter(model.cfg, LoraSpec(rank=4), seed=1)
    ours = _logits(model, adapter)
    kw = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    out = export_merged_hf(model, tmp_path / "merged", tokenizer_dir=bases[family], adapter=adapter, **kw)

    files = {f.name for f in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(p.name.startswith(".") for p in [*out.iterdir(), *tmp_path.iterdir()])  # no temp dirs left
    if shard_bytes:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and "model.safetensors" not in files
    else:
        assert "model.safetensors" in files
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False  # a tied model with an unembed LoRA is exported untied

    _close(_torch_logits(_hf_model(out)), ours)
    _close(_logits(load_decoder(out)), ours)  # and our own loader reads it back


def test_export_merged_keeps_tie_without_unembed_lora(base_models, tmp_path):
    model = base_models["qwen3_tied"]
    adapter = _adapter(model.cfg, LoraSpec.from_flags(2, train_unembed=False), seed=2)
    out = export_merged_hf(model, tmp_path / "m", adapter=adapter)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert not (out / "tokenizer.json").exists()
    _close(_torch_logits(_hf_model(out)), _logits(model, adapter))
    with pytest.raises(FileExistsError):
        export_merged_hf(model, out, adapter=adapter)
    export_merged_hf(model, out, adapter=adapter, overwrite=True)
    plain = export_merged_hf(model, tmp_path / "plain")  # no adapter: the base model itself
    _close(_torch_logits(_hf_model(plain)), _logits(model))


# ------------------------------------------------------------------------------------------- PEFT adapters


PEFT_CASES = [
    ("qwen3_tied", LoraSpec(rank=4), ALL_MODULES + ["lm_head"]),  # lm_head LoRA on a tied unembedding
    ("qwen3_tied", LoraSpec(rank=4, alpha=8, targets=("unembed",)), ["lm_head"]),
    ("qwen2", LoraSpec(rank=8, alpha=16, targets=("attn",)), ALL_MODULES[:4]),
    ("llama3_rope", LoraSpec(rank=4, targets=("mlp", "unembed")), ALL_MODULES[4:] + ["lm_head"]),
    ("qwen2", LoraSpec(rank=2, alpha=4, targets=("q", "v")), ["q_proj", "v_proj"]),  # single projections
    ("qwen3_moe", LoraSpec(rank=4), ALL_MODULES + ["lm_head"]),  # one adapter per expert
    # dense layers' attention adapters too (their mlp adapters: test_export_peft_of_moe_with_dense_layers)
    ("qwen3_moe_mixed", LoraSpec(rank=4, targets=("attn", "unembed")), ALL_MODULES[:4] + ["lm_head"]),
]


@pytest.mark.parametrize("case", range(len(PEFT_CASES)))
def test_export_peft_matches_peft_and_round_trips(bases, base_models, tmp_path, case):
    family, spec, targets = PEFT_CASES[case]
    model = base_models[family]
    adapter = _adapter(model.cfg, spec, seed=3)
    ours = _logits(model, adapter)
    out = export_peft_adapter(adapter, model.cfg, tmp_path / "adapter", base_model_name_or_path=str(bases[family]))

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["bias"]) == ("LORA", "CAUSAL_LM", "none")
    assert sorted(cfg["target_modules"]) == sorted(targets)
    assert cfg["r"] == spec.rank and cfg["lora_alpha"] == spec.alpha
    assert cfg["base_model_name_or_path"] == str(bases[family])

    peft_model = peft.PeftModel.from_pretrained(_hf_model(bases[family]), out)
    _close(_torch_logits(peft_model), ours)

    # Round trip: PEFT dir -> spec and adapter -> the same logits.
    assert lora_spec_from_peft(out) == spec
    back = load_peft_adapter(out, model.cfg)
    assert back.spec == spec
    _close(_logits(model, back), ours, atol=1e-6)


def test_export_peft_of_moe_with_dense_layers(bases, base_models, tmp_path):
    """Every projection adapted on a MoE model with dense layers: the dense layers' `mlp.gate_proj` and the MoE
    layers' `mlp.experts.E.gate_proj` each get their own adapter. peft 0.21 on transformers 5 cannot load this (its
    v4 -> v5 conversion maps every `gate_proj` target to the fused experts and drops the dense layers' ones), so the
    file is checked by merging it into the HF weights by hand, as PEFT defines its keys (W += scale * B @ A), and
    comparing transformers' logits with ours."""
    family = "qwen3_moe_mixed"
    model = base_models[family]
    adapter = _adapter(model.cfg, LoraSpec(rank=4), seed=5)
    ours = _logits(model, adapter)
    out = export_peft_adapter(adapter, model.cfg, tmp_path / "adapter", base_model_name_or_path=str(bases[family]))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in tensors  # dense layer
    assert "base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.weight" in tensors  # MoE layer
    assert not any(k.startswith("base_model.model.model.layers.1.mlp.gate_proj") for k in tensors)

    hf = _hf_model(bases[family])
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    scale = adapter.spec.scale
    for key in [k for k in tensors if k.endswith(".lora_A.weight")]:
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        delta = scale * (torch.from_numpy(tensors[key.replace("lora_A", "lora_B")]) @ torch.from_numpy(tensors[key]))
        m = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj$", module)
        if m is None:
            sd[module + ".weight"] += delta
        elif m[3] == "down":  # transformers 5's fused experts: down_proj [E, D, I], gate_up_proj [E, 2I, D]
            sd[m[1] + ".down_proj"][int(m[2])] += delta
        else:
            width = sd[m[1] + ".gate_up_proj"].shape[1] // 2
            rows = slice(0, width) if m[3] == "gate" else slice(width, 2 * width)
            sd[m[1] + ".gate_up_proj"][int(m[2]), rows] += delta
    hf.load_state_dict(sd)
    _close(_torch_logits(hf), ours)
    back = load_peft_adapter(out, model.cfg)  # and our own loader reads it back
    _close(_logits(model, back), ours, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_load_adapter_saved_by_peft(bases, base_models, tmp_path, use_rslora):
    """An adapter written by peft itself (not by us) loads and matches PeftModel's logits; PEFT's usual q/v-only
    adapter included."""
    for modules in (ALL_MODULES, ["q_proj", "v_proj"]):
        torch.manual_seed(7)
        config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=modules, use_rslora=use_rslora,
                                 task_type="CAUSAL_LM")
        peft_model = peft.get_peft_model(_hf_model(bases["qwen2"]), config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
        d = tmp_path / "-".join(modules)
        peft_model.save_pretrained(d)
        want = _torch_logits(peft_model.eval())

        spec = lora_spec_from_peft(d)
        assert spec.rank == 4 and spec.targets == lora_math.parse_targets(modules)
        assert spec.scale == pytest.approx(16 / 2 if use_rslora else 16 / 4)
        _close(_logits(base_models["qwen2"], load_peft_adapter(d, base_models["qwen2"].cfg)), want)


def test_mismatch_errors(bases, base_models, tmp_path):
    cfg = base_models["qwen2"].cfg
    out = export_peft_adapter(_adapter(cfg, LoraSpec(rank=4, targets=("attn", "mlp")), 4), cfg, tmp_path / "a",
                              "base")
    one_layer = dataclasses.replace(cfg, n_layers=1)
    with pytest.raises(ConvertError, match=r"target mismatch: adapter has LoRA on model\.layers\.\{1\}"):
        load_peft_adapter(out, one_layer)
    wider = dataclasses.replace(cfg, d_ff=cfg.d_ff * 2)
    with pytest.raises(ConvertError, match=r"mlp\.gate_proj lora_[AB] has shape .* the model expects"):
        load_peft_adapter(out, wider)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora_spec_from_peft(tmp_path)
    emb = peft.get_peft_model(_hf_model(bases["qwen2"]), peft.LoraConfig(r=4, target_modules=["embed_tokens"]))
    emb.save_pretrained(tmp_path / "emb")
    with pytest.raises(ConvertError, match="not a LoRA A/B weight|cannot adapt"):
        lora_spec_from_peft(tmp_path / "emb")
