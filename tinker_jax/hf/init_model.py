"""`tinker-jax init-model`: write a freshly initialised Hugging Face model directory from a preset.

The directory holds `config.json`, `generation_config.json`, `model.safetensors` (float32, HF names from
`tinker_jax.hf.weights.hf_shapes`), `tokenizer.json` and `tokenizer_config.json`; transformers'
`AutoModelForCausalLM` / `AutoTokenizer` load it offline.

Weights are a pure function of (preset, seed): each tensor draws from its own
`numpy.random.default_rng([seed, crc32(name)])`, so the bytes are reproducible and do not depend on the
order tensors are generated in. Linear and embedding weights ~ N(0, std) (std 0.1 for tiny presets,
0.02 otherwise; see `presets.INIT_STD`), RMSNorm weights ~ 1 + 0.1 N(0, 1), biases ~ N(0, 0.1).

The write is atomic: everything goes into a temporary directory beside OUT which is renamed into place
at the end; on any error the temporary directory is removed and OUT is untouched.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import save_file

from tinker_jax.atomic import atomic_dir
from tinker_jax.hf.presets import INIT_STD, get_preset
from tinker_jax.hf.tokenizer import ENDOFTEXT, IM_END, save_hf_tokenizer, special_token_ids, train_tokenizer

NORM_STD = 0.1
BIAS_STD = 0.1


def init_weights(hf_shapes: Mapping[str, tuple[int, ...]], seed: int, std: float) -> dict[str, np.ndarray]:
    """HF name -> float32 array; deterministic in (seed, name)."""
    out = {}
    for name, shape in hf_shapes.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        z = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith(".bias"):
            x = z * np.float32(BIAS_STD)
        elif name.endswith("norm.weight"):  # input_layernorm, post_attention_layernorm, q_norm, k_norm, norm
            x = np.float32(1.0) + z * np.float32(NORM_STD)
        else:
            x = z * np.float32(std)
        out[name] = np.ascontiguousarray(x, dtype=np.float32)
    return out


def generation_config(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    ids = special_token_ids(int(hf_config["vocab_size"]))
    return {
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
        "pad_token_id": ids[ENDOFTEXT],
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _write_weights(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    # Sorted names: safetensors' on-disk order (and so the bytes) never depends on dict order.
    save_file({k: tensors[k] for k in sorted(tensors)}, str(path), metadata={"format": "pt"})


def _set_modes(d: Path) -> None:
    # Fixed modes (not umask-derived: reading the umask means changing it, which is not thread-safe).
    for f in d.iterdir():
        os.chmod(f, 0o644)
    os.chmod(d, 0o755)


def _check_target(out: Path, force: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: directory exists and is not empty (use --force to replace it)")


def init_model(out_dir: str | os.PathLike, preset: str, seed: int = 0, force: bool = False) -> Path:
    """Write a HF model directory for `preset` at `out_dir`; returns its path.

    Raises ValueError for an unknown preset and FileExistsError if `out_dir` is non-empty (unless `force`,
    which replaces it).
    """
    hf_config = get_preset(preset)
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out_dir).absolute()
    _check_target(out, force)  # fail fast, before the (slow) JAX imports

    from tinker_jax.models.config import config_from_hf
    from tinker_jax.hf.weights import hf_shapes

    cfg = config_from_hf(hf_config, source=f"preset {preset!r}")
    tok = train_tokenizer(cfg.vocab_size)
    if tok.get_vocab_size(with_added_tokens=True) != cfg.vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} ids, config says {cfg.vocab_size}")
    tensors = init_weights(hf_shapes(cfg), seed, INIT_STD.get(preset, 0.02))

    with atomic_dir(out, overwrite=force) as tmp:
        _write_weights(tmp / "model.safetensors", tensors)
        _write_json(tmp / "config.json", hf_config)
        _write_json(tmp / "generation_config.json", generation_config(hf_config))
        save_hf_tokenizer(tok, tmp, model_max_length=cfg.max_position_embeddings)
        _set_modes(tmp)
    return out
