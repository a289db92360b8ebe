"""The in-process tinker_jax.ServiceClient every "ours" figure goes through (the public API, not engine internals)."""

from __future__ import annotations

from pathlib import Path


def service_client(model_name: str, model_dir: Path, data_dir: Path, *, dtype: str, max_tokens_per_batch: int,
                   sampler_batch: int, sampler_seq_len: int, compile_cache_dir: Path | None = None,
                   remat: bool = False, attention: str = "auto", prefix_cache: bool = False, **sampler_kw):
    """A ServiceClient serving `model_dir` as `model_name`. The persistent compile cache, when given, lives in
    `compile_cache_dir` (shared across bench runs) instead of data_dir/jax_cache; it only shortens warm-up.
    prefix_cache (sampler.prefix_cache) is off unless asked for: benchmarks time the same prompts again and again,
    and a prompt found cached is not prefilled, which the peers beside ours always pay for."""
    import jax

    import tinker_jax
    from tinker_jax.config import EngineConfig, SamplerConfig

    if compile_cache_dir is not None and not jax.config.jax_compilation_cache_dir:
        compile_cache_dir.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(compile_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    cfg = EngineConfig(data_dir=data_dir, models={model_name: str(model_dir)}, dtype=dtype,
                       max_tokens_per_batch=max_tokens_per_batch, compile_cache=compile_cache_dir is not None,
                       remat=remat, attention=attention,
                       sampler=SamplerConfig(max_batch=sampler_batch, max_seq_len=sampler_seq_len,
                                             max_num_samples=max(64, sampler_batch), prefix_cache=prefix_cache,
                                             **sampler_kw))
    return tinker_jax.ServiceClient(config=cfg)
