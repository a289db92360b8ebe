"""Build a Sampler for a base model directory: EOS ids, tokenizer (for stop strings) and config knobs."""

from __future__ import annotations

from typing import Any

from tinker_jax.hf.model_files import eos_ids_of, load_tokenizer
from tinker_jax.sampling.scheduler import Sampler


def make_sampler(base: Any, config: Any = None, on_submit=None, **overrides) -> Sampler:
    """Sampler for `base` (anything with `.cfg`, `.path` and `.decoder`), started; or, with `on_submit`, driven by
    the caller's thread (Sampler.drive: it calls `step()`, `on_submit` wakes it).

    `config` is a SamplerConfig-like object; its max_batch, max_seq_len, max_num_samples (and any other
    Sampler keyword it shares) are used, then `overrides` (e.g. `mesh=`: the engine's mesh, which the base weights
    were loaded onto). The KV cache takes the decoder's compute dtype.
    `config.backend` "vllm" returns a started vllm_backend.VLLMSampler instead (same public interface).
    """
    backend = getattr(config, "backend", None) or "jax"
    if backend == "vllm":
        from tinker_jax.sampling.vllm_backend import VLLMSampler  # lazy: vllm is the optional `gpu` extra

        return VLLMSampler(base, config, **overrides).start()
    if backend != "jax":
        raise ValueError(f"sampler.backend: expected 'jax' or 'vllm', got {backend!r}")
    kw: dict[str, Any] = {}
    for name in ("max_batch", "max_seq_len", "max_num_samples", "prefill_lengths", "prefill_batches",
                 "prefill_token_budget", "prefill_chunk", "decode_steps", "decode_unroll", "decode_attention",
                 "prefill_attention",
                 "max_topk_prompt_logprobs", "max_stop_tokens", "max_adapters", "kv_cache_tokens", "page_size",
                 "prefix_cache", "burst_gap_ms"):
        if config is not None and getattr(config, name, None) is not None:
            kw[name] = getattr(config, name)
    kw.update(overrides)
    path = getattr(base, "path", None)
    decoder = getattr(base, "decoder", None)
    if "cache_dtype" not in kw and decoder is not None:
        kw["cache_dtype"] = decoder.dtype
    if "tokenizer" not in kw:
        kw["tokenizer"] = load_tokenizer(path)
    sampler = Sampler(base.cfg, eos_ids_of(base.cfg, path), **kw)
    return sampler.drive(on_submit) if on_submit is not None else sampler.start()
