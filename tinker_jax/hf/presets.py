"""Model presets for `tinker-jax init-model`: preset name -> Hugging Face `config.json` dict.

Each dict is a complete, loadable HF config (real `architectures` / `model_type`), written verbatim as
`config.json`. Token ids come from `tinker_jax.hf.tokenizer.special_token_ids` (Qwen2.5-Instruct conventions:
bos = `<|endoftext|>`, eos = `<|im_end|>`, pad = `<|endoftext|>`), so config and tokenizer agree.
RoPE is stated the transformers-4 way (`rope_theta`, `rope_scaling`), which transformers 4.56+ and 5.x both
accept and `tinker_jax.models.config.config_from_hf` reads.

The tiny presets use deliberately odd-ish sizes (d_ff 96, head_dim != d_model / n_heads is allowed) so
shape bugs show up in parity tests.
"""

from __future__ import annotations

import copy
from typing import Any

from tinker_jax.hf.tokenizer import ENDOFTEXT, IM_END, special_token_ids


def _base(arch: str, model_type: str, *, vocab_size: int, hidden_size: int, layers: int, heads: int,
          kv_heads: int, head_dim: int, intermediate: int, tie: bool, max_pos: int, rope_theta: float,
          **extra: Any) -> dict[str, Any]:
    ids = special_token_ids(vocab_size)
    cfg: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": tie,
        "use_cache": True,
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    cfg.update(extra)
    return cfg


def _qwen_sliding(layers: int) -> dict[str, Any]:
    return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": layers}


def _moe(experts: int, per_tok: int, width: int) -> dict[str, Any]:
    return {"num_experts": experts, "num_experts_per_tok": per_tok, "moe_intermediate_size": width,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": False,
            "router_aux_loss_coef": 0.001}


_TINY = dict(vocab_size=512, hidden_size=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=96,
             max_pos=512)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny-qwen3": _base("Qwen3ForCausalLM", "qwen3", **_TINY, tie=True, rope_theta=10000.0,
                        attention_bias=False, **_qwen_sliding(2)),
    "tiny-llama3": _base("LlamaForCausalLM", "llama", **_TINY, tie=False, rope_theta=500000.0,
                         attention_bias=False, mlp_bias=False, pretraining_tp=1,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Qwen2 always has q/k/v biases (no config flag); untied, so lm_head is exercised for this family too.
    "tiny-qwen2": _base("Qwen2ForCausalLM", "qwen2", **_TINY, tie=False, rope_theta=10000.0, **_qwen_sliding(2)),
    "small-qwen3": _base("Qwen3ForCausalLM", "qwen3", vocab_size=8192, hidden_size=512, layers=8, heads=8,
                         kv_heads=4, head_dim=64, intermediate=1536, tie=True, max_pos=4096, rope_theta=1e6,
                         attention_bias=False, **_qwen_sliding(8)),
    # Mixture of experts as Qwen3-30B-A3B lays it out (untied, renormalised top-k), scaled down: 8 experts, 2 a token.
    "tiny-qwen3-moe": _base("Qwen3MoeForCausalLM", "qwen3_moe", **_TINY, tie=False, rope_theta=10000.0,
                            attention_bias=False, **_qwen_sliding(2), **_moe(experts=8, per_tok=2, width=24)),
    # Dense layers among the MoE ones: decoder_sparse_step 2 makes layers 0, 2, 4 dense, mlp_only_layers adds 5
    # (the decoder runs it as two stacks, dense and MoE, scanned in layer order).
    "tiny-qwen3-moe-mixed": _base("Qwen3MoeForCausalLM", "qwen3_moe", **{**_TINY, "layers": 6}, tie=False,
                                  rope_theta=10000.0, attention_bias=False, **_qwen_sliding(6),
                                  **{**_moe(experts=8, per_tok=2, width=24), "decoder_sparse_step": 2,
                                     "mlp_only_layers": [5], "norm_topk_prob": False}),
    "small-qwen3-moe": _base("Qwen3MoeForCausalLM", "qwen3_moe", vocab_size=8192, hidden_size=512, layers=8,
                             heads=8, kv_heads=4, head_dim=64, intermediate=1536, tie=False, max_pos=4096,
                             rope_theta=1e6, attention_bias=False, **_qwen_sliding(8),
                             **_moe(experts=32, per_tok=4, width=256)),
}

# Weight init scale per preset: tiny models use larger weights so parity tests see non-trivial activations.
INIT_STD: dict[str, float] = {"tiny-qwen3": 0.1, "tiny-llama3": 0.1, "tiny-qwen2": 0.1, "small-qwen3": 0.02,
                              "tiny-qwen3-moe": 0.1, "tiny-qwen3-moe-mixed": 0.1,
                              "small-qwen3-moe": 0.02}


def get_preset(name: str) -> dict[str, Any]:
    """A fresh copy of preset `name`'s HF config dict; ValueError listing the presets if unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])
