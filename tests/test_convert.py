"""Export to HF (merged) and PEFT, and PEFT back in: logits must match transformers / peft within 1e-4."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tinker_jax.hf.convert import (ConvertError, export_merged_hf, export_peft_adapter,  # noqa: E402
                                load_peft_adapter, lora_spec_from_peft)
from tinker_jax.models.lora import LoraSpec  # noqa: E402
from tinker_jax.models.decoder import Decoder  # noqa: E402
from tinker_jax.hf.weights import load_decoder  # noqa: E402

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


def _lora_model(base_model, spec: LoraSpec, seed: int) -> Decoder:
    """`base_model`'s weights plus random non-zero LoRA A and B (a fresh adapter has B = 0, a no-op).

    Equivalent to `load_decoder(dir, lora=spec)` + randomising, without compiling a full init per spec
    (load_decoder jit-compiles the whole model init for the adapter values: ~5-10 s on a small CPU).
    """
    abstract = nnx.eval_shape(lambda: Decoder(base_model.cfg, rngs=nnx.Rngs(0), lora=spec))
    graphdef, _, lora_state = nnx.split(abstract, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)), nnx.LoRAParam)
    model = nnx.merge(graphdef, nnx.state(base_model, nnx.Param), lora_state)
    return _randomize_lora(model, seed)


def _randomize_lora(model, seed):
    rs = np.random.RandomState(seed)  # numpy: no per-shape compiles
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(0.1 * rs.standard_normal(x.shape), x.dtype), state))
    return model


TOKENS = np.random.RandomState(0).randint(0, 512, (2, 12)).astype(np.int32)
POSITIONS = np.tile(np.arange(TOKENS.shape[1], dtype=np.int32), (TOKENS.shape[0], 1))
_forward = nnx.jit(lambda model, tokens, positions: model.logits(model(tokens, positions)[0]))


def _logits(model):
    """tinker_jax logits: h, _ = model(tokens, positions); model.logits(h) (jitted: one compile per structure)."""
    return np.asarray(_forward(model, TOKENS, POSITIONS))


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def _close(a, b, atol=1e-4):
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------- merged export


@pytest.mark.parametrize("family,shard_bytes", [("qwen3_tied", None), ("qwen2", None), ("llama3_rope", 60_000)])
def test_export_merged_matches_transformers(bases, base_models, tmp_path, family, shard_bytes):
    model = _lora_model(base_models[family], LoraSpec(rank=4), seed=1)
    ours = _logits(model)
    kw = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    out = export_merged_hf(model, tmp_path / "merged", tokenizer_dir=bases[family], **kw)

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
    model = _lora_model(base_models["qwen3_tied"], LoraSpec(rank=2, train_unembed=False), seed=2)
    out = export_merged_hf(model, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert not (out / "tokenizer.json").exists()
    _close(_torch_logits(_hf_model(out)), _logits(model))
    with pytest.raises(FileExistsError):
        export_merged_hf(model, out)
    export_merged_hf(model, out, overwrite=True)


# ------------------------------------------------------------------------------------------- PEFT adapters


PEFT_CASES = [
    ("qwen3_tied", LoraSpec(rank=4), ALL_MODULES + ["lm_head"]),  # lm_head LoRA on a tied unembedding
    ("qwen3_tied", LoraSpec(rank=4, alpha=8, train_attn=False, train_mlp=False), ["lm_head"]),
    ("qwen2", LoraSpec(rank=8, alpha=16, train_mlp=False, train_unembed=False), ALL_MODULES[:4]),
    ("llama3_rope", LoraSpec(rank=4, train_attn=False), ALL_MODULES[4:] + ["lm_head"]),
]


@pytest.mark.parametrize("case", range(len(PEFT_CASES)))
def test_export_peft_matches_peft_and_round_trips(bases, base_models, tmp_path, case):
    family, spec, targets = PEFT_CASES[case]
    model = _lora_model(base_models[family], spec, seed=3)
    ours = _logits(model)
    out = export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(bases[family]))

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["bias"]) == ("LORA", "CAUSAL_LM", "none")
    assert sorted(cfg["target_modules"]) == sorted(targets)
    assert cfg["r"] == spec.rank and cfg["lora_alpha"] == spec.alpha
    assert cfg["base_model_name_or_path"] == str(bases[family])

    peft_model = peft.PeftModel.from_pretrained(_hf_model(bases[family]), out)
    _close(_torch_logits(peft_model), ours)

    # Round trip: PEFT dir -> spec -> a fresh Decoder -> the same logits. The first case goes through the real
    # load_decoder(dir, lora=...) path (adapter init included); the others reuse the base weights (faster).
    assert lora_spec_from_peft(out) == spec
    fresh = load_decoder(bases[family], lora=lora_spec_from_peft(out)) if case == 0 else \
        _lora_model(base_models[family], lora_spec_from_peft(out), seed=99)
    back = load_peft_adapter(fresh, out)
    assert back is fresh
    _close(_logits(back), ours, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_load_adapter_saved_by_peft(bases, base_models, tmp_path, use_rslora):
    """An adapter written by peft itself (not by us) loads and matches PeftModel's logits."""
    torch.manual_seed(7)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=ALL_MODULES, use_rslora=use_rslora,
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(_hf_model(bases["qwen2"]), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(tmp_path / "a")
    want = _torch_logits(peft_model.eval())

    spec = lora_spec_from_peft(tmp_path / "a")
    assert (spec.rank, spec.train_attn, spec.train_mlp, spec.train_unembed) == (4, True, True, False)
    assert spec.scale == pytest.approx(16 / 2 if use_rslora else 16 / 4)
    model = load_peft_adapter(_lora_model(base_models["qwen2"], spec, seed=0), tmp_path / "a")
    _close(_logits(model), want)


def test_mismatch_errors(bases, base_models, tmp_path):
    base = base_models["qwen2"]
    out = export_peft_adapter(_lora_model(base, LoraSpec(rank=4, train_unembed=False), 4), tmp_path / "a", "base")
    build = lambda **kw: _lora_model(base, LoraSpec(**kw), seed=0)  # noqa: E731

    with pytest.raises(ConvertError, match="rank mismatch.*r=4.*rank=8"):
        load_peft_adapter(build(rank=8, train_unembed=False), out)
    with pytest.raises(ConvertError, match="scale mismatch"):
        load_peft_adapter(build(rank=4, alpha=8, train_unembed=False), out)
    with pytest.raises(ConvertError, match=r"target mismatch: adapter has LoRA on .*mlp\.down_proj"):
        load_peft_adapter(build(rank=4, train_mlp=False, train_unembed=False), out)
    with pytest.raises(ConvertError, match="target mismatch: model adapts lm_head"):
        load_peft_adapter(build(rank=4), out)
    with pytest.raises(ConvertError, match="no LoRA"):
        load_peft_adapter(base, out)
    with pytest.raises(ConvertError, match="no LoRA"):
        export_peft_adapter(base, tmp_path / "b", "base")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora_spec_from_peft(tmp_path)

    # PEFT's common q_proj/v_proj-only adapter covers half a role: not representable, say so.
    qv = peft.get_peft_model(_hf_model(bases["qwen2"]), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    qv.save_pretrained(tmp_path / "qv")
    with pytest.raises(ConvertError, match=r"only part of the 'attn' role \(missing \['k_proj', 'o_proj'\]\)"):
        lora_spec_from_peft(tmp_path / "qv")
    with pytest.raises(ConvertError, match="target mismatch: model adapts .*k_proj"):
        load_peft_adapter(build(rank=4, alpha=8, train_mlp=False, train_unembed=False), tmp_path / "qv")
