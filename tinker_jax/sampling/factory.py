"""Build a Sampler for a base model directory: EOS ids, tokenizer (for stop strings) and config knobs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tinker_jax.sampling.scheduler import Sampler

log = logging.getLogger(__name__)


def eos_ids_of(cfg, model_dir: str | Path | None) -> tuple[int, ...]:
    """The implicit stop set: config.json's eos_token_id plus generation_config.json's (what HF generate
    stops on; Qwen instruct models list <|im_end|> and <|endoftext|> there)."""
    ids: list[int] = []

    def add(x):
        if isinstance(x, int):
            ids.append(x)
        elif isinstance(x, (list, tuple)):
            ids.extend(int(t) for t in x)

    add(cfg.eos_token_id)
    gen = Path(model_dir) / "generation_config.json" if model_dir else None
    if gen is not None and gen.is_file():
        try:
            add(json.loads(gen.read_text()).get("eos_token_id"))
        except (OSError, ValueError):
            log.warning("sampler: unreadable %s; using config.json's eos_token_id only", gen)
    return tuple(dict.fromkeys(ids))


def load_tokenizer(model_dir: str | Path | None):
    """The HF tokenizer of a model directory, or None (then stop strings are refused with a ValueError)."""
    if model_dir is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - a directory without tokenizer files still samples token ids
        log.warning("sampler: no tokenizer in %s (%s); stop strings will be refused", model_dir, e)
        return None


def make_sampler(base: Any, config: Any = None, **overrides) -> Sampler:
    """Sampler for `base` (anything with `.cfg`, `.path` and `.decoder`, e.g. engine.BaseModel), started.

    `config` is a SamplerConfig-like object; its max_batch, max_seq_len, max_num_samples (and any other
    Sampler keyword it shares) are used, then `overrides`. The KV cache takes the decoder's compute dtype.
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
                 "prefill_token_budget", "decode_steps", "decode_unroll", "max_topk_prompt_logprobs",
                 "max_stop_tokens"):
        if config is not None and getattr(config, name, None) is not None:
            kw[name] = getattr(config, name)
    kw.update(overrides)
    path = getattr(base, "path", None)
    decoder = getattr(base, "decoder", None)
    if "cache_dtype" not in kw and decoder is not None:
        kw["cache_dtype"] = decoder.dtype
    if "tokenizer" not in kw:
        kw["tokenizer"] = load_tokenizer(path)
    return Sampler(base.cfg, eos_ids_of(base.cfg, path), **kw).start()
