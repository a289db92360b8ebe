"""Engine configuration: a YAML file from configs/ (or a dict), every knob described where it is declared."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from tinker_jax.distributed import DistributedConfig
from tinker_jax.models.decoder import ATTENTION_IMPLS, DECODE_ATTENTION
from tinker_jax.models.quant import MODES as QUANTIZE_MODES
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
    decode_steps: int = 8  # jax: most decode steps per device call (one host round trip each; the call ends
    #                        sooner when its rows finish or a row frees for a waiting request; stop strings are
    #                        checked between calls)
    decode_unroll: bool = False  # jax: unroll the layer loop of a decode step (more code, fewer loop iterations;
    #                              slower on CPUs; with the paged cache not measured on a GPU: measure first)
    decode_attention: str = "auto"  # jax: a decode step's attention: einsum | reduce | paged | auto (reduce on
    #                                 CPUs, where it was faster; einsum elsewhere). paged: a Pallas kernel reading
    #                                 each row's pages in place (GPUs; interpreted elsewhere; not yet measured)
    prefill_attention: str = "einsum"  # jax: a whole-prompt prefill's attention: einsum (the exact reference) |
    #                                    cudnn (GPU flash attention, bf16) | xla; long prompts' chunks: einsum
    burst_gap_ms: float = 2.0  # jax: an idle sampler waits while requests keep arriving this close together
    #                            (up to 10 gaps) and prefills and decodes them together; a lone request waits one
    #                            gap; 0: off
    prefill_chunk: int = 512  # jax: a longer prompt is prefilled this many tokens per sampler step (running
    #                           decodes keep their pace; its attention memory grows linearly with its length; its
    #                           keys and values go into KV-pool pages, so it waits for free pages); 0: off
    max_adapters: int = 16  # jax: LoRA adapters resident per rank at once (rows of different adapters decode
    #                         together; a request whose adapter finds no free place waits for one)
    kv_cache_tokens: int | None = None  # jax: KV cache size in tokens, all rows together (default max_batch *
    #                                     max_seq_len); paged: a row takes what its prompt + max_tokens need, the
    #                                     samples of one prompt share its full pages; a sample waits for free pages
    page_size: int = 16  # jax: tokens per KV-cache page
    prefix_cache: bool = True  # jax: prompts' KV pages stay for later requests that start the same way
    #                            or prefix of whole prefill_chunks (the next turn) until rows need the pages
    # jax: the sampler's compute and weight dtype, "float32" or "bfloat16"; None: the engine's `dtype`. A dtype
    # other than the engine's keeps a copy of the base weights in it for sampling (bf16: half the bytes read per
    # decode step; logits and logprobs stay fp32, within docs/numerics.md's tolerance of the trainer's).
    dtype: str | None = None
    # jax: "int8": the decoder blocks' projections and MoE experts sample from int8 weights with a scale per
    # output channel (a quarter of fp32's weight bytes, half of bf16's, read per decode step), computed in `dtype`;
    # embeddings, an untied unembedding, norms and MoE routers are kept as they are, LoRA adapters apply on top.
    # Logprobs then differ from the trainer's by docs/numerics.md's measured int8 deviation. null: off.
    quantize: str | None = None

    def __post_init__(self):
        # Here, not only in EngineConfig.from_dict: an in-process EngineConfig(sampler=SamplerConfig(...)) gets the
        # same error naming the field when it is built, not a failed model load later.
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"config.sampler.dtype: expected float32, bfloat16 or null, got {self.dtype!r}")
        if self.decode_attention not in ("auto", *DECODE_ATTENTION):
            raise ValueError(f"config.sampler.decode_attention: expected auto or one of {DECODE_ATTENTION}, got "
                             f"{self.decode_attention!r}")
        if self.prefill_attention not in ATTENTION_IMPLS:
            raise ValueError(f"config.sampler.prefill_attention: expected one of {ATTENTION_IMPLS}, got "
                             f"{self.prefill_attention!r}")
        if self.quantize not in (None, *QUANTIZE_MODES):
            raise ValueError(f"config.sampler.quantize: expected one of {QUANTIZE_MODES} or null, got "
                             f"{self.quantize!r}")
        if not (isinstance(self.burst_gap_ms, (int, float)) and not isinstance(self.burst_gap_ms, bool)
                and 0 <= self.burst_gap_ms <= 50):
            raise ValueError(f"config.sampler.burst_gap_ms: expected a number of milliseconds in [0, 50], got "
                             f"{self.burst_gap_ms!r}")
        if self.quantize and self.backend != "jax":
            raise ValueError("config.sampler.quantize: only the jax sampler backend quantizes weights "
                             f"(backend is {self.backend!r})")


@dataclass(frozen=True)
class LoraConfig:
    """What a LoRA run adapts, as the seed's backend offers: rank comes from the client; alpha and the target
    projections from here. Defaults are the hosted service's: alpha 32 and every projection (the SDK's train_attn /
    train_mlp / train_unembed flags then select roles among these)."""

    alpha: float = 32.0
    # q, k, v, o, gate, up, down, unembed (PEFT names q_proj, ..., lm_head and roles attn / mlp also accepted)
    target_modules: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down", "unembed")
    max_rank: int = 256  # largest rank a client may ask for (also never above the model's width)
    initial_slots: int = 4  # adapter slots allocated per rank at first use (grows by doubling)
    max_slots: int = 64  # adapters trained at once per rank and base model (a create beyond fails, retryably)

    def __post_init__(self):
        from tinker_jax.models.lora import parse_targets

        object.__setattr__(self, "target_modules", parse_targets(self.target_modules, "config.lora.target_modules"))
        if not self.target_modules:
            raise ValueError("config.lora.target_modules: must name at least one projection")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"config.lora.alpha: must be a positive number, got {self.alpha!r}")
        for k in ("max_rank", "initial_slots", "max_slots"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"config.lora.{k}: must be >= 1")


@dataclass(frozen=True)
class EngineConfig:
    data_dir: Path = field(default_factory=default_data_dir)  # checkpoints, registry, compile cache
    models: Mapping[str, str] = field(default_factory=dict)  # base_model name/alias -> local HF directory
    dtype: str = "float32"  # compute dtype of base models: "float32" or "bfloat16" (trained weights stay fp32)
    mesh: MeshConfig = MeshConfig()  # data x expert x fsdp x tensor device mesh
    max_tokens_per_batch: int = 8192  # padded tokens per training micro-batch
    max_seq_len: int = 4096  # longest training sequence accepted (also capped by the model's own limit)
    max_tokens_per_request: int = 1 << 20  # tokens in one forward / forward_backward request (its host memory)
    # Disk for the checkpoints of one owner (API key), in bytes: what is on disk plus the owner's saves still
    # queued for it (engine.quota); a save, export or copy past it fails naming the limit. None: unlimited.
    # In-process runs (no owner) are never limited.
    checkpoint_quota_bytes: int | None = None
    full_finetune: bool = False  # train every weight instead of LoRA adapters
    remat: bool = False  # recompute layer activations in backward (long sequences on GPU/TPU); slower on CPU
    # Training attention kernel: "auto" (cuDNN flash attention on a GPU computing in bfloat16, else "einsum"),
    # "einsum" (plain XLA, the exact reference), "cudnn" (GPU, bfloat16 only), "xla" (jax.nn.dot_product_attention).
    attention: str = "auto"
    compile_cache: bool = True  # persistent XLA compilation cache under {data_dir}/jax_cache (faster restarts)
    sampler: SamplerConfig = SamplerConfig()
    lora: LoraConfig = LoraConfig()
    # Scheduling: forward/forward_backward requests of all runs of a base model are batched per round, up to this
    # many tokens (split into micro-batches of max_tokens_per_batch); every ready run gets one request in first.
    round_tokens: int = 32768
    # How long a round may wait for runs that were active a moment ago but have nothing queued (tenants between two
    # steps of their loop), so their requests share one batch; 0: never wait. A lone run never waits.
    batch_window_ms: float = 5.0
    max_queued_per_tenant: int = 1024  # requests in flight per tenant (REST session); beyond: HTTP 429, retried
    max_queued: int = 8192  # requests in flight in the whole engine; beyond: HTTP 429, retried
    # Samples recorded for StableReinforce (engine.stability): at most this many tokens (prompt + sampled, per
    # sequence), each kept this long after its last use.
    stability_log_tokens: int = 1 << 25
    stability_idle_s: float = 3600.0
    local_paths: bool = True  # base_model may name a local HF directory not in `models` (the server turns it off)
    # Several processes (hosts) as one engine over one global mesh (tinker_jax.distributed): coordinator,
    # num_processes, process_id, or from_env. Unset: this process alone.
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):  # as SamplerConfig's: built in process or from a file, the same error names the field
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"config.dtype: expected float32 or bfloat16, got {self.dtype!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"config.attention: expected one of {ATTENTION_CHOICES}, got {self.attention!r}")

    @staticmethod
    def from_dict(d: Mapping[str, Any], base_dir: Path | None = None) -> "EngineConfig":
        d = dict(d or {})
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; known: {sorted(known)}")
        if "mesh" in d:
            d["mesh"] = MeshConfig.from_dict(d["mesh"])
        if "distributed" in d and not isinstance(d["distributed"], DistributedConfig):
            d["distributed"] = DistributedConfig.from_dict(d["distributed"])
        if "sampler" in d:
            s = dict(d["sampler"] or {})
            bad = sorted(set(s) - {f.name for f in fields(SamplerConfig)})
            if bad:
                raise ValueError(f"config.sampler: unknown keys {bad}")
            d["sampler"] = SamplerConfig(**s)  # which checks its values
        if "lora" in d:
            s = dict(d["lora"] or {})
            bad = sorted(set(s) - {f.name for f in fields(LoraConfig)})
            if bad:
                raise ValueError(f"config.lora: unknown keys {bad}")
            if "target_modules" in s:
                s["target_modules"] = tuple(s["target_modules"] or ())
            d["lora"] = LoraConfig(**s)
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
