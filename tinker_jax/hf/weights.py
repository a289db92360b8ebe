"""Hugging Face names live here and nowhere else: one key table drives load, export and init-model.

Family differences are rows that apply or not (qkv biases, q/k norms, an untied lm_head).
Loading streams tensors from safetensors shards one name at a time straight into their (sharded)
device placement, so the host never holds the whole model.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from tinker_jax.models.config import ModelConfig, load_config
from tinker_jax.models.decoder import Decoder


class WeightsError(ValueError):
    """A checkpoint that does not match its config; the message names the file and tensor."""


@dataclass(frozen=True)
class HFTensor:
    hf: str  # HF name; "{i}" marks a per-layer tensor
    path: tuple[str, ...]  # path in the Decoder's state
    transpose: bool = False  # HF Linear weights are [out, in]; our kernels are [in, out]
    when: Callable[[ModelConfig], bool] = lambda cfg: True


_L = "model.layers.{i}."
HF_TABLE: tuple[HFTensor, ...] = (
    HFTensor("model.embed_tokens.weight", ("embed",)),
    HFTensor("model.norm.weight", ("final_norm", "scale")),
    HFTensor("lm_head.weight", ("lm_head", "kernel"), True, lambda c: not c.tie_embeddings),
    HFTensor(_L + "input_layernorm.weight", ("blocks", "attn_norm", "scale")),
    HFTensor(_L + "post_attention_layernorm.weight", ("blocks", "mlp_norm", "scale")),
    *(HFTensor(_L + f"self_attn.{p}_proj.weight", ("blocks", "attn", p, "kernel"), True) for p in "qkvo"),
    *(HFTensor(_L + f"self_attn.{p}_proj.bias", ("blocks", "attn", p, "bias"), False, lambda c: c.qkv_bias)
      for p in "qkv"),
    *(HFTensor(_L + f"self_attn.{p}_norm.weight", ("blocks", "attn", f"{p}_norm", "scale"), False,
               lambda c: c.qk_norm) for p in "qk"),
    *(HFTensor(_L + f"mlp.{p}_proj.weight", ("blocks", "mlp", p, "kernel"), True) for p in ("gate", "up", "down")),
)


def table(cfg: ModelConfig) -> list[HFTensor]:
    return [t for t in HF_TABLE if t.when(cfg)]


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of this config -> its HF shape (used by init-model and checks)."""
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    out = {}
    for t in table(cfg):
        shape = _get(abstract, t.path).shape
        per_layer = "{i}" in t.hf
        shape = shape[1:] if per_layer else shape
        shape = tuple(reversed(shape)) if t.transpose else tuple(shape)
        for i in range(cfg.n_layers if per_layer else 1):
            out[t.hf.format(i=i)] = shape
    return out


def _get(state, path):
    for k in path:
        state = state[k]
    return state


class _Shards:
    """Name -> file index over one or more safetensors files; opens lazily, reads one tensor at a time."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            wm = json.loads(index.read_text())["weight_map"]
            self.where = {k: model_dir / v for k, v in wm.items()}
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise WeightsError(f"{model_dir}: no *.safetensors files found")
            self.where = {}
            for f in files:
                with safe_open(str(f), framework="numpy") as h:
                    self.where.update({k: f for k in h.keys()})
        self._open: dict[Path, object] = {}

    def read(self, name: str) -> np.ndarray:
        f = self.where.get(name)
        if f is None:
            raise WeightsError(f"missing weight tensor '{name}' in {sorted(set(map(str, self.where.values())))}")
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="numpy")
        return self._open[f].get_tensor(name)


def load_decoder(model_dir: str | Path, *, dtype=jnp.float32, param_dtype=None, shardings_fn=None) -> Decoder:
    """Build a Decoder from a local HF directory.

    `param_dtype` (default: `dtype`) is the storage dtype of the base weights.
    `shardings_fn(state) -> pytree of Sharding` places each tensor as it is read (None: default device).
    """
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    param_dtype = param_dtype or dtype
    make = lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype)
    abstract = nnx.eval_shape(make)
    graphdef, base_state = nnx.split(abstract, nnx.Param)
    base_sh = shardings_fn(base_state) if shardings_fn else None
    shards = _Shards(model_dir)
    pure = base_state.to_pure_dict()
    # Host side, numpy: copy each HF tensor, as stored, into one [L, ...] host buffer per weight role; then one
    # transfer per role into its placement, where one program transposes and casts it (_to_device). Per-tensor
    # device ops compiled a small program per shape (the 0.6B shape took 9 s on a CPU); numpy's own transposes
    # and bf16 casts were the next largest cost.
    for t in table(cfg):
        target = _get(base_state, t.path)
        per_layer = "{i}" in t.hf
        names = [t.hf.format(i=i) for i in range(cfg.n_layers)] if per_layer else [t.hf]
        want = tuple(target.shape[1:] if per_layer else target.shape)
        stored = tuple(reversed(want)) if t.transpose else want  # HF layout
        buf = None  # stored dtype and layout: numpy's transposes and bf16 casts are slow, the device's are not
        for i, name in enumerate(names):
            x = shards.read(name)
            if tuple(x.shape) != stored:
                raise WeightsError(f"{model_dir}: tensor '{name}' has shape {tuple(x.shape)}, expected {stored}")
            if buf is None:
                buf = np.empty((len(names), *stored) if per_layer else stored, x.dtype)
            (buf[i] if per_layer else buf)[...] = x
        sh = _get(base_sh, t.path) if base_sh is not None else None
        _set(pure, t.path, _to_device(buf, t.transpose, np.dtype(param_dtype), sh))
    base_state.replace_by_pure_dict(pure)
    return nnx.merge(graphdef, base_state)


def _to_device(buf: np.ndarray, transpose: bool, dtype: np.dtype, sharding=None) -> jax.Array:
    """Host buffer in HF layout (last two axes [out, in]) -> device array [.., in, out] in `dtype`, placed
    with `sharding` (the target layout's); the transpose and cast run on the device, one program per role."""
    if not transpose and buf.dtype == dtype:
        return jax.device_put(buf, sharding) if sharding is not None else jnp.asarray(buf)
    src = sharding
    if sharding is not None and transpose:  # the buffer's own layout: the last two spec entries swapped
        spec = tuple(sharding.spec) + (None,) * (buf.ndim - len(sharding.spec))
        src = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[:-2], spec[-1], spec[-2]))
    x = jax.device_put(buf, src) if src is not None else jnp.asarray(buf)
    return _finish(x, transpose=transpose, dtype=dtype, out_sharding=sharding)


@functools.partial(jax.jit, static_argnames=("transpose", "dtype", "out_sharding"))
def _finish(x, *, transpose, dtype, out_sharding):
    y = (jnp.swapaxes(x, -1, -2) if transpose else x).astype(dtype)
    return jax.lax.with_sharding_constraint(y, out_sharding) if out_sharding is not None else y


def _set(d: dict, path, value):
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def iter_hf_tensors(model: Decoder) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, numpy array in HF layout) for every base weight: the inverse of load_decoder."""
    cfg = model.cfg
    state = nnx.state(model, nnx.Param)
    for t in table(cfg):
        x = np.asarray(jax.device_get(_get(state, t.path)[...]))
        if "{i}" in t.hf:
            for i in range(cfg.n_layers):
                yield t.hf.format(i=i), (x[i].T if t.transpose else x[i])
        else:
            yield t.hf, (x.T if t.transpose else x)
