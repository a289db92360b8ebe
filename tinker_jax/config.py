"""Engine configuration: a YAML file from configs/ (or a dict), every knob described where it is declared."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from tinker_jax.models.decoder import ATTENTION_IMPLS
from tinker_jax.models.sharding import MeshConfig

ATTENTION_CHOICES = ("auto", *ATTENTION_IMPLS)


def default_data_dir() -> Path:
    """Per-user default: $TINKER_JAX_DATA_DIR, else $XDG_DATA_HOME/tinker_jax, else ~/.local/share/tinker_jax."""
    if os.environ.get("TINKER_JAX_DATA_DIR"):
        return Path(os.environ["TINKER_JAX_DATA_DIR"])
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "tinker_jax"


@dataclass(frozen=True)
class SamplerConfig:
    backend: str = "jax"  # "jax" (default everywhere) or "vllm" (GPU, needs the `gpu` extra)
    max_batch: int = 16  # rows decoded together (continuous batching slots)
    max_seq_len: int = 1024  # prompt + generated tokens per row (KV-cache length)
    max_num_samples: int = 64  # cap on num_samples per request
    max_lora_rank: int = 64  # vllm: largest adapter rank served (rounded up to a rank vLLM accepts)
    max_loras: int = 4  # vllm: adapters resident on the GPU at once
    gpu_memory_utilization: float = 0.4  # vllm: its share of GPU memory (JAX training needs the rest)
    decode_steps: int = 8  # jax: decode steps per device call (one host round trip each; stop strings are
    #                        checked between calls)
    decode_unroll: bool = False  # jax: unroll the layer loop of a decode step (more code, fewer loop iterations)


@dataclass(frozen=True)
class EngineConfig:
    data_dir: Path = field(default_factory=default_data_dir)  # checkpoints, registry, compile cache
    models: Mapping[str, str] = field(default_factory=dict)  # base_model name/alias -> local HF directory
    dtype: str = "float32"  # compute dtype of base models: "float32" or "bfloat16" (trained weights stay fp32)
    mesh: MeshConfig = MeshConfig()  # data x fsdp x tensor device mesh
    max_tokens_per_batch: int = 8192  # padded tokens per training micro-batch
    max_seq_len: int = 4096  # longest training sequence accepted (also capped by the model's own limit)
    full_finetune: bool = False  # train every weight instead of LoRA adapters
    remat: bool = False  # recompute layer activations in backward (long sequences on GPU/TPU); slower on CPU
    # Training attention kernel: "auto" (cuDNN flash attention on a GPU computing in bfloat16, else "einsum"),
    # "einsum" (plain XLA, the exact reference), "cudnn" (GPU, bfloat16 only), "xla" (jax.nn.dot_product_attention).
    attention: str = "auto"
    compile_cache: bool = True  # persistent XLA compilation cache under {data_dir}/jax_cache (faster restarts)
    sampler: SamplerConfig = SamplerConfig()

    @staticmethod
    def from_dict(d: Mapping[str, Any], base_dir: Path | None = None) -> "EngineConfig":
        d = dict(d or {})
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; known: {sorted(known)}")
        if d.get("dtype", "float32") not in ("float32", "bfloat16"):
            raise ValueError(f"config.dtype: expected float32 or bfloat16, got {d['dtype']!r}")
        if d.get("attention", "auto") not in ATTENTION_CHOICES:
            raise ValueError(f"config.attention: expected one of {ATTENTION_CHOICES}, got {d['attention']!r}")
        if "mesh" in d:
            d["mesh"] = MeshConfig.from_dict(d["mesh"])
        if "sampler" in d:
            s = dict(d["sampler"] or {})
            bad = sorted(set(s) - {f.name for f in fields(SamplerConfig)})
            if bad:
                raise ValueError(f"config.sampler: unknown keys {bad}")
            d["sampler"] = SamplerConfig(**s)
        if "data_dir" in d:
            d["data_dir"] = Path(os.path.expanduser(str(d["data_dir"])))
        if "models" in d:  # relative model paths are relative to the config file
            d["models"] = {str(k): str((base_dir / os.path.expanduser(v)) if base_dir and not
                                       os.path.isabs(os.path.expanduser(v)) else os.path.expanduser(v))
                           for k, v in (d["models"] or {}).items()}
        return EngineConfig(**d)

    @staticmethod
    def load(path: str | Path | None) -> "EngineConfig":
        if path is None:
            return EngineConfig()
        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"config {path}: {e}") from None
        return EngineConfig.from_dict(d, base_dir=path.parent)

    def training_attention(self, backend: str) -> str:
        """The attention kernel the training step uses on `backend` (jax.default_backend())."""
        if self.attention != "auto":
            return self.attention
        return "cudnn" if backend == "gpu" and self.dtype == "bfloat16" else "einsum"

    def with_models(self, extra: Mapping[str, str]) -> "EngineConfig":
        from dataclasses import replace

        return replace(self, models={**self.models, **extra})
