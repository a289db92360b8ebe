"""ModelConfig: the one place a Hugging Face `config.json` is read.

Families differ only in data (qkv bias, q/k norm, rope scaling, tied embeddings); the decoder reads these
fields and never the family name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

# HF `architectures` entry -> family. Qwen2.5 checkpoints declare Qwen2ForCausalLM.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


# The decoder's layer stacks: "blocks", every layer of the model's own kind, and "dense_blocks", a MoE model's dense
# layers (ModelConfig.stack_layers).
STACKS = ("blocks", "dense_blocks")


class ConfigError(ValueError):
    """A config.json that cannot describe a supported model; the message names the file and field."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (`rope_scaling.rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" | "qwen2" | "qwen3" | "qwen3_moe": for messages and export, never for behaviour
    architecture: str  # HF class name, written back on export
    vocab_size: int  # V
    d_model: int  # D
    n_layers: int  # L
    n_heads: int  # N
    n_kv_heads: int  # K
    head_dim: int  # H
    d_ff: int  # F
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False  # Qwen2 / attention_bias
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # Mixture of experts (Qwen3-MoE): every layer's feed-forward is E experts of width I, k per token
    # (models.moe); 0 experts is the dense SwiGLU of width F.
    n_experts: int = 0  # E
    n_experts_per_tok: int = 0  # k
    d_expert: int = 0  # I
    norm_topk_prob: bool = False  # renormalise the k routing weights to sum to 1
    # A MoE model's dense layers (HF: `mlp_only_layers`, and the layers `decoder_sparse_step` skips): their feed-forward
    # is the dense SwiGLU of width F. They form a second stack of layers (see `stack_layers`).
    dense_layers: tuple[int, ...] = ()
    # The raw dict, kept for export; excluded from hashing so the config can be static jit data.
    hf_config: Mapping[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def n_params(self) -> int:
        """Parameter count (base model, no LoRA)."""
        D, N, K, H, V = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.vocab_size
        attn = D * N * H + 2 * D * K * H + N * H * D + (N * H + 2 * K * H if self.qkv_bias else 0)
        attn += 2 * H if self.qk_norm else 0
        ffn = (self.n_moe_layers * self._moe_params(self.n_experts)
               + (self.n_layers - self.n_moe_layers) * 3 * D * self.d_ff)  # MoE layers, then dense ones
        return self.n_layers * (attn + 2 * D) + ffn + V * D * (1 if self.tie_embeddings else 2) + D

    @property
    def n_active_params(self) -> int:
        """Parameters one token computes with: n_params less the experts it is not routed to."""
        return self.n_params - self.n_moe_layers * (self._moe_params(self.n_experts) - self._moe_params(
            self.n_experts_per_tok)) if self.is_moe else self.n_params

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - len(self.dense_layers) if self.is_moe else 0

    def stack_layers(self, stack: str) -> tuple[int, ...]:
        """The layers (in order) of one of the decoder's stacks: "blocks", every layer of the model's own kind (all
        layers of a dense model, the MoE layers of a MoE model), or "dense_blocks", a MoE model's dense layers."""
        if stack not in STACKS:
            raise ValueError(f"stack: expected one of {STACKS}, got {stack!r}")
        return tuple(i for i, s in enumerate(self.layer_stacks()) if s == stack)

    def layer_stacks(self) -> tuple[str, ...]:
        """The stack of every layer, in layer order."""
        dense = set(self.dense_layers)
        return tuple("dense_blocks" if i in dense else "blocks" for i in range(self.n_layers))

    def _moe_params(self, experts: int) -> int:
        """One MoE layer's feed-forward parameters counting `experts` experts (and the whole router)."""
        D = self.d_model
        return D * self.n_experts + 3 * D * self.d_expert * experts

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)


def _get(d: Mapping[str, Any], key: str, source: str, default: Any = ...) -> Any:
    if key in d and d[key] is not None:
        return d[key]
    if default is ...:
        raise ConfigError(f"{source}: required field '{key}' is missing")
    return default


def _rope_scaling(d: Mapping[str, Any], source: str) -> RopeScaling | None:
    rs = d.get("rope_scaling")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ConfigError(f"{source}: rope_scaling type '{kind}' is not supported (supported: llama3)")
    try:
        return RopeScaling(
            factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"{source}: rope_scaling is missing field {e}") from None


def config_from_hf(d: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a HF config dict. `source` names the file in error messages."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a JSON object")
    archs = d.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ConfigError(
            f"{source}: unsupported architecture {archs or d.get('model_type')!r}; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]
    d_model = int(_get(d, "hidden_size", source))
    n_heads = int(_get(d, "num_attention_heads", source))
    head_dim = int(_get(d, "head_dim", source, d_model // n_heads))
    if family == "qwen2":
        qkv_bias = True  # Qwen2/2.5 always carry q/k/v biases (no config flag)
    else:
        qkv_bias = bool(d.get("attention_bias", False))
    if d.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")
    rope_params = d.get("rope_parameters") or {}
    rope_theta = float(d.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
    rope_src = d if d.get("rope_scaling") else {"rope_scaling": rope_params}
    eos = d.get("eos_token_id")
    moe = _moe_fields(d, source) if family == "qwen3_moe" else {}
    return ModelConfig(
        family=family,
        architecture=arch,
        vocab_size=int(_get(d, "vocab_size", source)),
        d_model=d_model,
        n_layers=int(_get(d, "num_hidden_layers", source)),
        n_heads=n_heads,
        n_kv_heads=int(_get(d, "num_key_value_heads", source, n_heads)),
        head_dim=head_dim,
        d_ff=int(_get(d, "intermediate_size", source)),
        norm_eps=float(_get(d, "rms_norm_eps", source, 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=int(_get(d, "max_position_embeddings", source, 4096)),
        rope_scaling=_rope_scaling(rope_src, source),
        qkv_bias=qkv_bias,
        qk_norm=family in ("qwen3", "qwen3_moe"),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        hf_config=dict(d),
        **moe,
    )


def _moe_fields(d: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Qwen3-MoE's expert fields. Checkpoints name the expert count `num_experts` (transformers 5 also reads
    `num_local_experts`)."""
    for key in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
        if d.get(key):  # Qwen2-MoE's and DeepSeek's always-on experts: not in this decoder
            raise ConfigError(f"{source}: {key}={d[key]!r}: shared experts are not supported (Qwen3-MoE has none)")
    n_experts = int(d.get("num_experts") or _get(d, "num_local_experts", source))
    k = int(_get(d, "num_experts_per_tok", source))
    if not 0 < k <= n_experts:
        raise ConfigError(f"{source}: num_experts_per_tok={k} must be between 1 and num_experts={n_experts}")
    return dict(n_experts=n_experts, n_experts_per_tok=k, d_expert=int(_get(d, "moe_intermediate_size", source)),
                norm_topk_prob=bool(d.get("norm_topk_prob", False)), dense_layers=_dense_layers(d, source))


def _dense_layers(d: Mapping[str, Any], source: str) -> tuple[int, ...]:
    """A MoE model's dense layers, as transformers picks them: layer i is a mixture of experts unless it is in
    `mlp_only_layers` or (i + 1) is not a multiple of `decoder_sparse_step`."""
    n_layers = int(_get(d, "num_hidden_layers", source))
    step = d.get("decoder_sparse_step")
    step = 1 if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ConfigError(f"{source}: decoder_sparse_step={step!r} must be a positive integer")
    only = d.get("mlp_only_layers") or []
    if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
        raise ConfigError(f"{source}: mlp_only_layers={only!r} must be a list of layer indices")
    bad = [i for i in only if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"{source}: mlp_only_layers has {bad}, outside the {n_layers} layers (0..{n_layers - 1})")
    dense = tuple(i for i in range(n_layers) if i in set(only) or (i + 1) % step)
    if len(dense) == n_layers:
        raise ConfigError(f"{source}: decoder_sparse_step={step}, mlp_only_layers={only}: no layer is a mixture of "
                          "experts (serve it as a dense model)")
    return dense


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (is '{model_dir}' a Hugging Face model directory?)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON ({e})") from None
    return config_from_hf(d, source=str(path))
