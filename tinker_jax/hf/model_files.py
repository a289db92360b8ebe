"""What a model directory says besides its weights: the EOS ids generation stops on and its tokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

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
