"""Model directories for the benchmarks, and FLOP counts per token.

- `ensure_model(cache, name)`: a local HF directory for a tinker_jax preset (`tiny-qwen3`, `small-qwen3`) or one of
  the bench-only presets below, written once with random weights and reused.
- `BENCH_PRESETS`: HF config dicts that live here, not in `tinker_jax/presets.py`: the Qwen3-0.6B shape for the GPU
  suite (nothing can be downloaded there) and a tiny model of the same family for its CPU dry run; for the "moe"
  section, Qwen3-30B-A3B's layer shape with 4 layers (fits one H100) and its toy-size dry-run twin.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tinker_jax.hf.tokenizer import ENDOFTEXT, IM_END, special_token_ids


def _qwen3(*, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, mlp: int,
           max_pos: int, dtype: str = "float32") -> dict[str, Any]:
    ids = special_token_ids(vocab_size)
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab_size,
        "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "hidden_act": "silu", "max_position_embeddings": max_pos, "initializer_range": 0.02,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "attention_bias": False,
        "attention_dropout": 0.0, "tie_word_embeddings": True, "use_cache": True,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": layers,
        "bos_token_id": ids[ENDOFTEXT], "eos_token_id": ids[IM_END], "pad_token_id": ids[ENDOFTEXT],
        "torch_dtype": dtype, "dtype": dtype,
    }


def _qwen3_moe(*, experts: int, per_tok: int, expert_mlp: int, **kw: Any) -> dict[str, Any]:
    """Qwen3-MoE as Qwen3-30B-A3B lays it out: every layer sparse, top-k renormalised, untied embeddings."""
    cfg = _qwen3(**kw)
    cfg.update({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "tie_word_embeddings": False,
                "num_experts": experts, "num_experts_per_tok": per_tok, "moe_intermediate_size": expert_mlp,
                "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "output_router_logits": False, "router_aux_loss_coef": 0.001})
    return cfg


BENCH_PRESETS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-0.6B's shape (596.0M parameters, tied embeddings), random weights.
    "qwen3-0.6b-shape": _qwen3(vocab_size=151936, hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128,
                               mlp=3072, max_pos=40960),
    # The same family at toy size: `gpu.sh --dry-run` exercises every code path on a CPU in seconds.
    "qwen3-dryrun": _qwen3(vocab_size=512, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=96,
                           max_pos=4096),
    # Qwen/Qwen3-30B-A3B's layer shape (hidden 2048, 32/4 heads of 128, 128 experts of width 768, 8 a token,
    # vocab 151,936, untied) with 4 of its 48 layers, random weights: 3.1B parameters (12.4 GB in fp32 on disk),
    # 0.9B active per token, so one H100 holds it with both frameworks' training state.
    "qwen3-30b-a3b-4l-shape": _qwen3_moe(vocab_size=151936, hidden=2048, layers=4, heads=32, kv_heads=4,
                                         head_dim=128, mlp=6144, max_pos=40960, experts=128, per_tok=8,
                                         expert_mlp=768),
    # The same family at toy size, for `gpu.sh --dry-run --only moe`.
    "qwen3-moe-dryrun": _qwen3_moe(vocab_size=512, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=96,
                                   max_pos=4096, experts=8, per_tok=2, expert_mlp=32),
}
BENCH_INIT_STD = 0.02


def write_bench_model(out: Path, hf_config: dict[str, Any], seed: int = 0) -> Path:
    """init_model's layout (config.json, generation_config.json, model.safetensors fp32, tokenizer) for a config
    dict defined here; atomic like init_model."""
    from safetensors.numpy import save_file

    from tinker_jax.hf.init_model import generation_config, init_weights
    from tinker_jax.models.config import config_from_hf
    from tinker_jax.hf.weights import hf_shapes
    from tinker_jax.hf.tokenizer import save_hf_tokenizer, train_tokenizer

    cfg = config_from_hf(hf_config, source="benchmarks preset")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tensors = init_weights(hf_shapes(cfg), seed, BENCH_INIT_STD)
        save_file({k: tensors[k] for k in sorted(tensors)}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(hf_config), indent=2) + "\n")
        save_hf_tokenizer(train_tokenizer(cfg.vocab_size), tmp, model_max_length=cfg.max_position_embeddings)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_model(cache_dir: Path, name: str, seed: int = 0) -> Path:
    """The HF directory for preset `name` under cache_dir, written on first use."""
    out = Path(cache_dir) / f"{name}-seed{seed}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if name in BENCH_PRESETS:
        return write_bench_model(out, BENCH_PRESETS[name], seed)
    from tinker_jax.hf.init_model import init_model

    return init_model(out, name, seed=seed, force=out.exists())


# ---------------------------------------------------------------------------------------------- FLOPs

def model_shape(model_dir: Path) -> dict[str, int]:
    """N (parameters, tied embedding counted once), the parameters one token computes with (n_active_params: N
    less the experts a token is not routed to; = N for a dense model), the expert counts (0 when dense) and the
    attention sizes the FLOP formulas need."""
    from tinker_jax.models.config import load_config
    from tinker_jax.hf.weights import hf_shapes

    cfg = load_config(model_dir)
    n = 0
    for shape in hf_shapes(cfg).values():
        k = 1
        for d in shape:
            k *= int(d)
        n += k
    return {"n_params": n, "n_active_params": n - (cfg.n_params - cfg.n_active_params), "n_layers": cfg.n_layers,
            "attn_dim": cfg.n_heads * cfg.head_dim, "vocab_size": cfg.vocab_size, "n_experts": cfg.n_experts,
            "n_experts_per_tok": cfg.n_experts_per_tok}


def attention_fwd_flops_per_token(shape: dict, seq_len: int) -> float:
    """Causal attention, forward: QK^T and AV over on average seq_len/2 keys: 2 * 2 * (T/2) * N*H per layer."""
    return 2.0 * shape["n_layers"] * seq_len * shape["attn_dim"]


def train_flops_per_token(shape: dict, seq_len: int, lora: bool, active: bool = False) -> float:
    """Full fine-tuning: 6N + 3x forward attention. LoRA: 4N (no weight gradients for the frozen base)
    + 3x forward attention (the backward through attention is still needed). Adapter FLOPs are ignored.
    active: N is the parameters one token computes with (n_active_params, for a mixture of experts: its k routed
    experts, not all E), so the figure counts the useful work, not what an implementation happens to compute."""
    n = shape["n_active_params"] if active else shape["n_params"]
    return (4.0 if lora else 6.0) * n + 3.0 * attention_fwd_flops_per_token(shape, seq_len)


def decode_flops_per_token(shape: dict, context: int, active: bool = False) -> float:
    """One generated token: 2N + attention over `context` cached keys (2 * 2 * context * N*H per layer)."""
    n = shape["n_active_params"] if active else shape["n_params"]
    return 2.0 * n + 4.0 * shape["n_layers"] * context * shape["attn_dim"]


def lora_params(model_dir: Path, rank: int, roles: tuple[str, ...] = ("attn", "mlp", "unembed")) -> dict[str, int]:
    """Trainable parameters of one tinker_jax LoRA adapter of `rank` on the projections of `roles`, per projection
    (a [in, R] + [R, out] pair per layer, and per expert for a mixture of experts' feed-forward) and in total."""
    from tinker_jax.models.config import load_config
    from tinker_jax.models.lora import PROJECTIONS, shapes

    cfg = load_config(model_dir)
    leaves = shapes(cfg, rank)
    out = {p.name: sum(math.prod(s) for s in leaves[p.name].values()) for p in PROJECTIONS if p.role in roles}
    out["total"] = sum(out.values())
    return out
