"""`tinker-jax init-model`: presets, the shipped tokenizer and the HF directories it writes.

Every preset's directory must load with transformers offline (model + tokenizer, no warnings), carry
exactly the weights in model.safetensors, and agree with its preset; writes are deterministic and atomic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
from safetensors.numpy import load_file

from tinker_jax.hf import init_model as im
from tinker_jax.hf import tokenizer as tkz
from tinker_jax.hf.init_model import init_model
from tinker_jax.hf.presets import PRESETS, get_preset

REPO = Path(__file__).resolve().parents[1]
ALL_PRESETS = ("tiny-qwen3", "tiny-llama3", "tiny-qwen2", "small-qwen3", "tiny-qwen3-moe")
TEXT = ("Hello, world! The baker's 12 loaves cost €4.50 each.\n\n"
        "def add(a, b):\n    return a + b\n\tcafé −2 °C  naïve   spaces\n")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {p: init_model(root / p, p, seed=0) for p in ALL_PRESETS}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(f"{record.name}: {record.getMessage()}")


def _load_hf(path: Path):
    """Load model + tokenizer with warnings as errors and transformers' own warning log captured."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    handler = _Records()
    logger = transformers.logging.get_logger()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = AutoModelForCausalLM.from_pretrained(path)
            tok = AutoTokenizer.from_pretrained(path)
    finally:
        logger.removeHandler(handler)
    assert handler.records == [], handler.records
    return model, tok


def _rope(hf_cfg) -> tuple[dict, float]:
    """(rope scaling dict or {}, theta) across transformers 4.x (rope_scaling) and 5.x (rope_parameters)."""
    params = dict(getattr(hf_cfg, "rope_parameters", None) or {})
    scaling = dict(getattr(hf_cfg, "rope_scaling", None) or {}) if not params else params
    theta = params.get("rope_theta", getattr(hf_cfg, "rope_theta", None))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return ({} if kind == "default" else scaling), float(theta)


# ---- presets ------------------------------------------------------------------------------------------------

def test_preset_specs():
    from tinker_jax.models.config import config_from_hf

    tiny = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96,
                max_position_embeddings=512, norm_eps=1e-6)
    want = {
        "tiny-qwen3": dict(tiny, architecture="Qwen3ForCausalLM", tie_embeddings=True, rope_theta=1e4,
                           qkv_bias=False, qk_norm=True, rope_scaling=None),
        "tiny-llama3": dict(tiny, architecture="LlamaForCausalLM", tie_embeddings=False, rope_theta=5e5,
                            qkv_bias=False, qk_norm=False),
        "tiny-qwen2": dict(tiny, architecture="Qwen2ForCausalLM", rope_theta=1e4, qkv_bias=True, qk_norm=False,
                           rope_scaling=None),
        "small-qwen3": dict(architecture="Qwen3ForCausalLM", vocab_size=8192, d_model=512, n_layers=8, n_heads=8,
                            n_kv_heads=4, head_dim=64, d_ff=1536, tie_embeddings=True,
                            max_position_embeddings=4096, rope_theta=1e6, qk_norm=True, rope_scaling=None),
        "tiny-qwen3-moe": dict(tiny, architecture="Qwen3MoeForCausalLM", tie_embeddings=False, qk_norm=True,
                               n_experts=8, n_experts_per_tok=2, d_expert=24, norm_topk_prob=True),
        # decoder_sparse_step 2 (layers 0, 2, 4 dense) and mlp_only_layers [5]
        "tiny-qwen3-moe-mixed": dict(tiny, n_layers=6, architecture="Qwen3MoeForCausalLM", n_experts=8,
                                     norm_topk_prob=False, dense_layers=(0, 2, 4, 5)),
        "small-qwen3-moe": dict(architecture="Qwen3MoeForCausalLM", d_model=512, n_layers=8, n_experts=32,
                                n_experts_per_tok=4, d_expert=256, tie_embeddings=False, qk_norm=True),
    }
    assert set(PRESETS) == set(want)
    for name, fields in want.items():
        d = get_preset(name)
        assert d["model_type"] == {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama",
                                   "Qwen2ForCausalLM": "qwen2", "Qwen3MoeForCausalLM": "qwen3_moe"}[d["architectures"][0]]
        assert d["hidden_act"] == "silu" and d["attention_dropout"] == 0.0 and d["use_cache"] is True
        assert d["torch_dtype"] == "float32" and d["dtype"] == "float32"
        cfg = config_from_hf(d)
        for k, v in fields.items():
            assert getattr(cfg, k) == v, (name, k, getattr(cfg, k), v)
        ids = tkz.special_token_ids(cfg.vocab_size)
        assert (d["bos_token_id"], d["eos_token_id"], d["pad_token_id"]) == (
            ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|endoftext|>"])
    rs = config_from_hf(get_preset("tiny-llama3")).rope_scaling
    assert (rs.factor, rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings) == (8, 1, 4, 64)
    n = config_from_hf(get_preset("small-qwen3")).n_params
    assert 28e6 < n < 31e6, n
    get_preset("tiny-qwen3")["vocab_size"] = 1  # a copy: the table itself is untouched
    assert PRESETS["tiny-qwen3"]["vocab_size"] == 512


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nope'.*small-qwen3.*tiny-llama3.*tiny-qwen2.*tiny-qwen3"):
        init_model(tmp_path / "out", "nope")
    assert list(tmp_path.iterdir()) == []


# ---- tokenizer ----------------------------------------------------------------------------------------------

def test_corpus_shipped():
    text = tkz.CORPUS_PATH.read_text(encoding="utf-8")
    assert 150_000 <= len(text.encode()) <= 300_000
    assert "<|" not in text  # special tokens never come from the corpus


@pytest.mark.parametrize("vocab_size", [tkz.MIN_VOCAB_SIZE, 300, 512, 8192, 12000])
def test_tokenizer_vocab_exact(vocab_size):
    tok = tkz.train_tokenizer(vocab_size)
    vocab = tok.get_vocab(with_added_tokens=True)
    assert len(vocab) == vocab_size == tok.get_vocab_size(with_added_tokens=True)
    assert sorted(vocab.values()) == list(range(vocab_size))
    specials = tkz.special_token_ids(vocab_size)
    assert specials == {"<|endoftext|>": vocab_size - 3, "<|im_start|>": vocab_size - 2, "<|im_end|>": vocab_size - 1}
    for s, i in specials.items():
        assert vocab[s] == i and tok.encode(s).ids == [i]
    n_bpe = tok.get_vocab_size(with_added_tokens=False)
    reserved = [t for t in vocab if t.startswith("<|reserved_")]
    assert n_bpe + len(reserved) + 3 == vocab_size
    assert tok.decode(tok.encode(TEXT).ids) == TEXT


def test_tokenizer_learns_thousands_of_merges():
    tok = tkz.train_tokenizer(8192)
    merges = tok.get_vocab_size(with_added_tokens=False) - 256
    assert merges >= 3000, merges


def test_tokenizer_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        tkz.train_tokenizer(tkz.MIN_VOCAB_SIZE - 1)


def test_tokenizer_deterministic_and_fast():
    """Same bytes when trained twice here and once in a fresh process (new Rust hash seeds)."""
    t0 = time.perf_counter()
    a = tkz._trained_json.__wrapped__(8192)
    elapsed = time.perf_counter() - t0
    print(f"small-qwen3 tokenizer (8192) trained in {elapsed:.2f} s")
    assert elapsed < 20, elapsed
    assert tkz._trained_json.__wrapped__(8192) == a
    # Load the module by path: tokenizer.py needs only `tokenizers`, and this skips the package __init__.
    code = ("import sys, hashlib, importlib.util as u; s = u.spec_from_file_location('tk', sys.argv[1]); "
            "t = u.module_from_spec(s); s.loader.exec_module(t); "
            "sys.stdout.write(hashlib.sha256(t._trained_json(8192).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code, tkz.__file__], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "RAYON_NUM_THREADS": "1"})
    assert out.stdout == hashlib.sha256(a.encode()).hexdigest()


# ---- written directories ------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ALL_PRESETS)
def test_directory_loads_in_transformers(model_dirs, preset):
    import torch
    from transformers import GenerationConfig

    from tinker_jax.models.config import load_config
    from tinker_jax.hf.weights import hf_shapes

    path = model_dirs[preset]
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((path / "config.json").read_text()) == PRESETS[preset]
    assert _leftovers(path.parent) == []
    assert path.stat().st_mode & 0o777 == 0o755 and (path / "model.safetensors").stat().st_mode & 0o777 == 0o644

    # The file holds exactly the HF tensors of the config, float32, with the documented init statistics.
    cfg = load_config(path)
    shapes = hf_shapes(cfg)
    tensors = load_file(str(path / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    assert all(v.dtype == np.float32 for v in tensors.values())
    std = 0.1 if preset.startswith("tiny") else 0.02
    emb = tensors["model.embed_tokens.weight"]
    assert abs(emb.std() - std) < 0.1 * std and abs(emb.mean()) < 0.1 * std
    norm = tensors["model.layers.0.input_layernorm.weight"]
    assert abs(norm.mean() - 1) < 0.05 and 0.05 < norm.std() < 0.15
    assert not np.array_equal(tensors["model.layers.0.self_attn.q_proj.weight"],
                              tensors["model.layers.1.self_attn.q_proj.weight"])

    model, tok = _load_hf(path)
    hc = model.config
    preset_d = PRESETS[preset]
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
              "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(hc, k) == preset_d[k], k
    assert type(model).__name__ == preset_d["architectures"][0]
    assert model.dtype == torch.float32
    scaling, theta = _rope(hc)
    assert theta == preset_d["rope_theta"]
    if preset == "tiny-llama3":
        assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
        assert scaling["original_max_position_embeddings"] == 64
    else:
        assert scaling == {}

    # Every weight transformers holds is the one we wrote (nothing silently re-initialised).
    from models_util import hf_checkpoint_layout  # MoE experts: transformers holds them fused

    sd = hf_checkpoint_layout({k: v.numpy() for k, v in model.state_dict().items()})
    for name, x in tensors.items():
        np.testing.assert_array_equal(sd[name], x, err_msg=name)
    extra = set(sd) - set(tensors)
    if preset_d["tie_word_embeddings"]:
        assert extra <= {"lm_head.weight"}
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert extra == set() and "lm_head.weight" in tensors
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    has_bias = any(k.endswith("self_attn.q_proj.bias") for k in sd)
    assert has_bias == (preset == "tiny-qwen2")
    assert any(k.endswith("self_attn.q_norm.weight") for k in sd) == ("qwen3" in preset)

    gen = GenerationConfig.from_pretrained(path)
    ids = tkz.special_token_ids(hc.vocab_size)
    assert gen.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert gen.pad_token_id == ids["<|endoftext|>"]

    # Tokenizer: exact vocabulary, Qwen2.5-Instruct special tokens, transformers == raw tokenizers.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert len(tok) == hc.vocab_size == raw.get_vocab_size()
    assert max(tok.get_vocab().values()) == hc.vocab_size - 1
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == hc.eos_token_id
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == hc.pad_token_id
    assert tok.bos_token is None
    assert tok.model_max_length == preset_d["max_position_embeddings"]
    enc = tok(TEXT)["input_ids"]
    assert enc == raw.encode(TEXT).ids
    assert tok.decode(enc) == TEXT
    assert tok.decode(tok("a<|im_end|>b")["input_ids"], skip_special_tokens=True) == "ab"
    assert tok("<|im_start|>")["input_ids"] == [ids["<|im_start|>"]]

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                    "<|im_start|>assistant\n5<|im_end|>\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    no_gen = tok.apply_chat_template(msgs[1:2], tokenize=False)
    assert no_gen == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
    chat_ids = tok(text)["input_ids"]
    assert chat_ids.count(ids["<|im_start|>"]) == 5 and chat_ids.count(ids["<|im_end|>"]) == 4

    # A forward pass runs and gives finite, non-degenerate logits.
    with torch.no_grad():
        logits = model(torch.tensor([chat_ids[:32]])).logits
    assert logits.shape == (1, min(32, len(chat_ids)), hc.vocab_size)
    assert torch.isfinite(logits).all() and logits.std() > 1e-3


def test_determinism(tmp_path, model_dirs):
    ref = model_dirs["tiny-qwen3"]
    same = init_model(tmp_path / "same", "tiny-qwen3", seed=0)
    other = init_model(tmp_path / "other", "tiny-qwen3", seed=1)
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert _sha(same / f) == _sha(ref / f), f
    assert _sha(other / "model.safetensors") != _sha(ref / "model.safetensors")
    assert _sha(other / "tokenizer.json") == _sha(ref / "tokenizer.json")  # the tokenizer ignores the seed
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert all(not np.array_equal(a[k], b[k]) for k in a)


def test_refuses_non_empty_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        init_model(out, "tiny-qwen3")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        init_model(tmp_path / "afile", "tiny-qwen3", force=True)
    # An existing empty directory is fine; --force replaces a non-empty one.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (init_model(empty, "tiny-qwen3") / "model.safetensors").is_file()
    init_model(out, "tiny-qwen3", force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("writer", ["_write_weights", "save_hf_tokenizer"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, writer):
    real = getattr(im, writer)

    def broken(*args, **kwargs):
        real(*args, **kwargs)  # leave a half-written temp dir behind, then fail
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(im, writer, broken)
    with pytest.raises(OSError, match="simulated"):
        init_model(tmp_path / "out", "tiny-qwen2")
    assert list(tmp_path.iterdir()) == []

    # With --force over an existing model, a failure keeps the old directory intact.
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(OSError, match="simulated"):
        init_model(old, "tiny-qwen2", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert [p.name for p in old.iterdir()] == ["keep.txt"]


def test_cli(tmp_path):
    out = tmp_path / "cli-model"
    cmd = [sys.executable, "-m", "tinker_jax.cli", "init-model", str(out), "--preset", "tiny-qwen2", "--seed", "3"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "tiny-qwen2" in r.stdout and str(out) in r.stdout
    ref = init_model(tmp_path / "ref", "tiny-qwen2", seed=3)
    assert _sha(out / "model.safetensors") == _sha(ref / "model.safetensors")


def test_cli_in_process(tmp_path, capsys):
    from tinker_jax import cli

    assert {"init-model", "serve", "bench"} <= set(cli.subcommands())
    assert cli.main(["init-model", str(tmp_path / "m"), "--preset", "tiny-llama3", "--seed", "5"]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    # Errors: exit status 2 and a message on stderr.
    assert cli.main(["init-model", str(tmp_path / "m"), "--preset", "tiny-llama3"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["init-model", str(tmp_path / "x"), "--preset", "huge"])
    assert e.value.code == 2 and "tiny-qwen3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([])
    assert not (tmp_path / "x").exists()
