"""Export a Decoder (and a run's LoRA adapter) to Hugging Face formats and read PEFT adapters back.

- `export_merged_hf`: a full HF model directory, with an adapter merged into the base weights when given
  (W + scale * A @ B, computed in fp32 and cast back to the base dtype).
- `export_peft_adapter`: a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
- `load_peft_adapter` / `lora_spec_from_peft`: the reverse of `export_peft_adapter`
  (loading a full HF directory is `weights.load_decoder`).

Hugging Face names come only from `weights.HF_TABLE`: a table row whose Decoder path ends in `kernel` is a
projection; its HF module name is the HF weight name minus `.weight`, its Decoder module is the path minus
`kernel`, and that module's `name` is the projection's name in models.lora. Adapter layouts: ours `a` [in, R],
`b` [R, out] (with a leading [L] on stacked layers); PEFT `lora_A.weight` [R, in], `lora_B.weight` [out, R]; both
use scale = lora_alpha / r.

Tied embeddings with an unembed LoRA: the logits are `h @ embed.T + scale * (h @ A) @ B`, and the LoRA does
not touch the input embedding. PEFT represents this faithfully as a LoRA on `lm_head` (whose base weight HF
ties to `embed_tokens`); PEFT logs a warning about tied weights on load but computes the same logits, as long
as `ensure_weight_tying` stays false (it is written false here). Caveat (peft 0.21): PEFT's own
`merge_and_unload()` on such an adapter adds the delta into the *shared* embed/lm_head tensor, corrupting the
input embeddings; use `export_merged_hf` instead. A merged export cannot stay tied (the output matrix differs
from the input one), so it is written untied: `tie_word_embeddings: false` plus an explicit `lm_head.weight`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from tinker_jax.atomic import atomic_dir
from tinker_jax.models import lora as lora_math
from tinker_jax.models.config import ModelConfig, config_from_hf
from tinker_jax.models.decoder import Decoder
from tinker_jax.models.lora import Adapter, LoraSpec
from tinker_jax.hf.weights import HF_TABLE, HFTensor, iter_hf_tensors

__all__ = [
    "ConvertError",
    "export_merged_hf",
    "export_peft_adapter",
    "load_peft_adapter",
    "lora_spec_from_peft",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9
_PEFT_PREFIX = "base_model.model."
_ST_METADATA = {"format": "pt"}  # transformers refuses safetensors files without a known format
# Files copied from `tokenizer_dir` into a merged export (never weights or config.json).
_TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|"
    r"chat_template\.(jinja|json)|.*\.tiktoken|spiece\.model|generation_config\.json|preprocessor_config\.json)$")


class ConvertError(ValueError):
    """An adapter or model that cannot be converted faithfully; the message names the file and field."""


# --------------------------------------------------------------------------------- projections <-> HF names


@dataclass(frozen=True)
class _Proj:
    row: HFTensor  # the HF_TABLE row of this projection's kernel (or of a MoE layer's stacked experts)
    module: str  # HF module name (template with "{i}" for per-layer modules, "{e}" for per-expert ones)
    path: tuple[str, ...]  # Decoder module path (an expert stack: the Param's own path)

    @property
    def short(self) -> str:  # PEFT target_modules entry, e.g. "q_proj", "lm_head"
        return self.module.rsplit(".", 1)[-1]

    def lead(self, cfg: ModelConfig) -> tuple[int, ...]:
        """The adapter's stacked axes before [in, R]: [L] per layer, [L, E] per expert, none for lm_head."""
        return self.row.lead(cfg)

    def names(self, cfg: ModelConfig) -> list[str]:
        """HF module names, in the order of np.ndindex(*lead)."""
        return [n[: -len(".weight")] for n in self.row.names(cfg)]

    def parts(self, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
        """(HF module name, index into the adapter's lead axes) for every module of this projection."""
        return list(zip(self.names(cfg), np.ndindex(*self.lead(cfg))))

    @property
    def leaves(self) -> tuple[str, str]:
        """The adapter's (a, b) leaves for this row: those of its decoder stack (models.lora.LEAVES)."""
        return lora_math.LEAVES.get(self.path[0], ("a", "b"))


def _projections() -> list[_Proj]:
    out = []
    for t in HF_TABLE:
        if t.path[-1] == "kernel" or "{e}" in t.hf:
            if not t.hf.endswith(".weight"):
                raise AssertionError(f"HF_TABLE projection row {t.hf!r} does not end in '.weight'")
            out.append(_Proj(t, t.hf[: -len(".weight")], t.path[:-1] if t.path[-1] == "kernel" else t.path))
    return out


def _module_at(model: nnx.Module, path: tuple[str, ...]):
    for k in path:
        model = getattr(model, k, None)
        if model is None:
            return None
    return model


@functools.lru_cache(maxsize=1)
def _names() -> dict[str, str]:
    """HF module template -> projection name, read off abstract untied Decoders, dense and mixture-of-experts (the
    names live in decoder.py: a Linear's `name`; an expert stack is named by its attribute)."""
    probe = {"vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
             "intermediate_size": 8, "tie_word_embeddings": False}
    moe = {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 2, "num_experts_per_tok": 1,
           "moe_intermediate_size": 8}
    out = {}
    for extra in ({"architectures": ["LlamaForCausalLM"]}, moe):
        cfg = config_from_hf({**probe, **extra}, source="<projection probe>")
        model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
        for p in _projections():
            if p.row.when(cfg):
                at = _module_at(model, p.path)
                out[p.module] = at.name if isinstance(at, nnx.Module) else p.path[-1]
    if not set(out.values()) <= set(lora_math.NAMES):
        raise AssertionError(f"HF_TABLE projections {sorted(set(out.values()) - set(lora_math.NAMES))} are not "
                             "models.lora projections")
    return out


def _adapted(spec: LoraSpec, cfg: ModelConfig) -> list[tuple[_Proj, str]]:
    """(HF projection, our projection name) for every projection `spec` adapts on a model of `cfg`, in HF_TABLE
    order."""
    names = _names()
    # An unembed adapter exists on tied models too, whose lm_head row does not apply (its base is the embedding).
    return [(p, names[p.module]) for p in _projections()
            if names[p.module] in spec.targets and (p.row.when(cfg) or names[p.module] == "unembed")]


def _np(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


# ------------------------------------------------------------------------------------------ file helpers


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], out: Path, max_shard_bytes: int) -> None:
    """HF layout: `model.safetensors`, or `model-0000k-of-0000n.safetensors` + index when over the limit.

    Streams: at most one shard (plus one tensor) is held on the host at a time.
    """
    parts: list[tuple[Path, list[str]]] = []
    cur: dict[str, np.ndarray] = {}
    cur_bytes = total = 0

    def flush():
        nonlocal cur, cur_bytes
        if cur:
            f = out / f".shard-{len(parts):05d}.safetensors"
            save_file(cur, str(f), metadata=_ST_METADATA)
            parts.append((f, list(cur)))
            cur, cur_bytes = {}, 0

    for name, x in tensors:
        x = np.ascontiguousarray(x)
        if cur and cur_bytes + x.nbytes > max_shard_bytes:
            flush()
        cur[name] = x
        cur_bytes += x.nbytes
        total += x.nbytes
    flush()
    if len(parts) == 1:
        os.rename(parts[0][0], out / "model.safetensors")
        return
    weight_map = {}
    for k, (f, names) in enumerate(parts):
        final = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
        os.rename(f, out / final)
        weight_map.update({n: final for n in names})
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


# ---------------------------------------------------------------------------------------- merged export


def _merged_tensors(model: Decoder, adapter: Adapter | None) -> Iterator[tuple[str, np.ndarray]]:
    cfg = model.cfg
    deltas: dict[str, tuple[np.ndarray, bool]] = {}  # weight name -> (delta [in, out], transpose)
    tied_head = None  # (HF name, delta [D, V]) of an unembed adapter on a tied model, whose base is `embed`
    if adapter is not None:
        w = adapter.numpy()
        for p, name in _adapted(adapter.spec, cfg):
            a, b = (w[name][k] for k in p.leaves)
            if name == "unembed" and cfg.tie_embeddings:
                tied_head = (p.row.hf, lora_math.merged_delta(a, b, adapter.spec.scale))
                continue
            for module, idx in p.parts(cfg):
                deltas[module + ".weight"] = (lora_math.merged_delta(a[idx], b[idx], adapter.spec.scale),
                                              p.row.transpose)
    embed_name = next(t.hf for t in HF_TABLE if t.path == ("embed",))
    for name, x in iter_hf_tensors(model):
        if name in deltas:
            d, transpose = deltas.pop(name)
            x = (x.astype(np.float32) + (d.T if transpose else d)).astype(x.dtype)
        yield name, x
        if name == embed_name and tied_head is not None:
            head, d = tied_head
            # HF lm_head.weight is [V, D] == embed [V, D]; the delta (A @ B) is [D, V].
            yield head, (x.astype(np.float32) + d.T).astype(x.dtype)
            tied_head = None
    if deltas or tied_head is not None:
        missing = sorted(deltas) + ([tied_head[0]] if tied_head else [])
        raise AssertionError(f"LoRA adapters with no base weight in iter_hf_tensors: {missing}")


def export_merged_hf(model: Decoder, out_dir: str | Path, tokenizer_dir: str | Path | None = None, *,
                     adapter: Adapter | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     overwrite: bool = False) -> Path:
    """Write a full HF model directory (with `adapter` merged into its base weights when given); returns `out_dir`.

    Writes config.json (from `model.cfg.hf_config`; `tie_word_embeddings` becomes false when a tied model has
    an unembed adapter, with an explicit `lm_head.weight`), model.safetensors (or shards + index above
    `max_shard_bytes`) and, from `tokenizer_dir`, the tokenizer files and generation_config.json.
    The directory appears atomically (temp dir + rename).
    """
    cfg = model.cfg
    if cfg.hf_config is None:
        raise ConvertError("model.cfg.hf_config is None: build the model with load_config/config_from_hf")
    hf_config = dict(cfg.hf_config)
    if cfg.tie_embeddings and adapter is not None and "unembed" in adapter.spec.targets:
        hf_config["tie_word_embeddings"] = False
    dtype = np.dtype(model.embed[...].dtype).name
    for key in ("torch_dtype", "dtype"):
        if key in hf_config or (key == "torch_dtype" and "dtype" not in hf_config):
            hf_config[key] = dtype
    tok_files = []
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir}: not a directory")
        tok_files = [f for f in sorted(tokenizer_dir.iterdir()) if f.is_file() and _TOKENIZER_FILES.match(f.name)]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _write_json(tmp / "config.json", hf_config)
        for f in tok_files:
            shutil.copy2(f, tmp / f.name)
        _write_safetensors(_merged_tensors(model, adapter), tmp, max_shard_bytes)
    return Path(out_dir)


# ------------------------------------------------------------------------------------------ PEFT adapter


def _peft_key(module: str, which: str) -> str:
    return f"{_PEFT_PREFIX}{module}.lora_{which}.weight"


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def export_peft_adapter(adapter: Adapter, cfg: ModelConfig, out_dir: str | Path, base_model_name_or_path: str, *,
                        overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, fp32); returns `out_dir`.

    Loadable with `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)`.
    """
    spec = adapter.spec
    rank, alpha = spec.rank, spec.alpha
    w = adapter.numpy()
    tensors: dict[str, np.ndarray] = {}
    targets: list[str] = []
    for p, name in _adapted(spec, cfg):
        if p.short not in targets:
            targets.append(p.short)
        a, b = (w[name][k] for k in p.leaves)
        for module, ai, bi in ((m, a[idx], b[idx]) for m, idx in p.parts(cfg)):
            tensors[_peft_key(module, "A")] = np.ascontiguousarray(ai.T)  # [R, in]
            tensors[_peft_key(module, "B")] = np.ascontiguousarray(bi.T)  # [out, R]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": _num(alpha),
        "lora_dropout": 0.0,
        "target_modules": targets,
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "trainable_token_indices": None,
        "layer_replication": None,
        "target_parameters": None,
        # true would make PEFT also put an adapter on embed_tokens for a tied lm_head: not our model.
        "ensure_weight_tying": False,
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _write_json(tmp / ADAPTER_CONFIG, config)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=_ST_METADATA)
    return Path(out_dir)


_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")


def _read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is '{adapter_dir}' a PEFT adapter directory?)")
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: malformed JSON ({e})") from None
    if c.get("peft_type", "LORA") != "LORA":
        raise ConvertError(f"{path}: peft_type {c.get('peft_type')!r} is not supported (only LORA)")
    if not isinstance(c.get("r"), int) or c["r"] <= 0:
        raise ConvertError(f"{path}: 'r' must be a positive integer, got {c.get('r')!r}")
    unsupported = {
        "use_dora": lambda v: bool(v), "lora_bias": lambda v: bool(v), "bias": lambda v: v not in (None, "none"),
        "modules_to_save": lambda v: bool(v), "rank_pattern": lambda v: bool(v), "alpha_pattern": lambda v: bool(v),
        "trainable_token_indices": lambda v: bool(v), "layer_replication": lambda v: bool(v),
        "target_parameters": lambda v: bool(v),
    }
    for key, bad in unsupported.items():
        if key in c and bad(c[key]):
            raise ConvertError(f"{path}: {key}={c[key]!r} is not supported by tinker_jax LoRA")
    return c


def _adapter_scale(c: dict) -> float:
    alpha = float(c.get("lora_alpha", 8))
    return alpha / math.sqrt(c["r"]) if c.get("use_rslora") else alpha / c["r"]


def _adapter_modules(adapter_dir: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    """adapter_model.safetensors -> {HF module name: {"A": key, "B": key}}."""
    f = adapter_dir / ADAPTER_WEIGHTS
    if not f.is_file():
        other = " (adapter_model.bin is not supported: re-save with safe_serialization=True)" \
            if (adapter_dir / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"{f}: not found{other}")
    modules: dict[str, dict[str, str]] = {}
    with safe_open(str(f), framework="numpy") as h:
        for key in h.keys():
            m = _KEY_RE.match(key)
            if m is None:
                raise ConvertError(f"{f}: tensor '{key}' is not a LoRA A/B weight (embedding LoRA, DoRA "
                                   "magnitudes and trainable tokens are not supported)")
            modules.setdefault(m["module"], {})[m["which"]] = key
    for mod, ab in modules.items():
        if set(ab) != {"A", "B"}:
            raise ConvertError(f"{f}: module '{mod}' has lora_{next(iter(ab))} but no lora_"
                               f"{'B' if 'A' in ab else 'A'}")
    return f, modules


def _template_of(module: str) -> str:
    """'model.layers.3.mlp.experts.5.up_proj' -> 'model.layers.{i}.mlp.experts.{e}.up_proj'."""
    return re.sub(r"(?<=\.experts\.)\d+(?=\.)", "{e}", re.sub(r"(?<=\.)\d+(?=\.)", "{i}", module, count=1))


def lora_spec_from_peft(adapter_dir: str | Path, *, seed: int = 0) -> LoraSpec:
    """The LoraSpec (rank, alpha, adapted projections) of a PEFT adapter. rsLoRA (scale alpha/sqrt(r)) is mapped to
    the equivalent alpha' = alpha*sqrt(r)."""
    adapter_dir = Path(adapter_dir)
    c = _read_adapter_config(adapter_dir)
    f, modules = _adapter_modules(adapter_dir)
    names = _names()
    templates = {_template_of(m) for m in modules}
    unknown = sorted(t for t in templates if t not in names)
    if unknown:
        raise ConvertError(f"{f}: LoRA on modules tinker_jax cannot adapt: {unknown} "
                           f"(supported: {sorted(names)})")
    scale = _adapter_scale(c)
    return LoraSpec(rank=c["r"], alpha=scale * c["r"], targets=tuple(names[t] for t in templates), seed=seed)


def load_peft_adapter(adapter_dir: str | Path, cfg: ModelConfig, *, seed: int = 0) -> Adapter:
    """A PEFT adapter as our Adapter for a model of `cfg` (ConvertError naming the file when modules or shapes do not
    fit); `lora_spec_from_peft` gives its spec alone."""
    adapter_dir = Path(adapter_dir)
    spec = lora_spec_from_peft(adapter_dir, seed=seed)
    f, modules = _adapter_modules(adapter_dir)
    expected = {m for p, _ in _adapted(spec, cfg) for m in p.names(cfg)}
    extra = sorted(set(modules) - expected)
    missing = sorted(expected - set(modules))
    if extra or missing:
        msg = []
        if extra:
            msg.append(f"adapter has LoRA on {_summarise(extra)}, which a {cfg.n_layers}-layer model does not have")
        if missing:
            msg.append(f"adapter lacks {_summarise(missing)}")
        raise ConvertError(f"{f}: target mismatch: {'; '.join(msg)}")
    want = lora_math.shapes(cfg, spec.rank)
    weights: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(f), framework="numpy") as h:
        for p, name in _adapted(spec, cfg):
            lead, names = p.lead(cfg), p.names(cfg)
            a, b = ([h.get_tensor(modules[n][w]).T for n in names] for w in "AB")
            for x, which in zip((a, b), p.leaves):  # each module's own [in, R] / [R, out] first
                bad = next((x_.shape for x_ in x if x_.shape != want[name][which][-2:]), None)
                if bad is not None:
                    raise ConvertError(f"{f}: {p.module} lora_{which[-1].upper()} has shape {bad[::-1]}, the model "
                                       f"expects {want[name][which][-2:][::-1]}")
            a = np.stack(a).astype(np.float32).reshape(*lead, *a[0].shape)  # [L?, E?, in, R]
            b = np.stack(b).astype(np.float32).reshape(*lead, *b[0].shape)  # [L?, E?, R, out]
            for x, which in zip((a, b), p.leaves):
                if tuple(x.shape) != want[name][which]:
                    shape = want[name][which][-2:][::-1]
                    raise ConvertError(f"{f}: {p.module} lora_{which[-1].upper()} has shape "
                                       f"{tuple(x.shape[-2:][::-1])}, the model expects {shape}")
            weights.setdefault(name, {}).update(zip(p.leaves, (jnp.asarray(a), jnp.asarray(b))))
    return Adapter(spec, weights)


def _summarise(names: list[str]) -> str:
    """Collapse per-layer names: ['model.layers.0.mlp.up_proj', ...] -> 'model.layers.{0,1}.mlp.up_proj'."""
    groups: dict[str, list[str]] = {}
    for n in names:
        m = re.search(r"(?<=\.)(\d+)(?=\.)", n)
        groups.setdefault(_template_of(n), []).append(m.group(1) if m else "")
    parts = [t.replace("{i}", "{" + ",".join(ix) + "}") if "{i}" in t else t for t, ix in groups.items()]
    return ", ".join(parts)
