"""Hugging Face names live here and nowhere else: one key table drives load, export and init-model.

Family differences are rows that apply or not (qkv biases, q/k norms, an untied lm_head).
Loading streams tensors from safetensors shards one name at a time straight into their (sharded)
device placement, so the host never holds the whole model.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from tinker_jax import distributed
from tinker_jax.models.config import ModelConfig, load_config
from tinker_jax.models.decoder import Decoder

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A checkpoint that does not match its config; the message names the file and tensor."""


@dataclass(frozen=True)
class HFTensor:
    hf: str  # HF name; "{i}" marks a per-layer tensor, "{e}" a per-expert one
    path: tuple[str, ...]  # path in the Decoder's state
    transpose: bool = False  # HF Linear weights are [out, in]; our kernels are [in, out]
    when: Callable[[ModelConfig], bool] = lambda cfg: True

    def lead(self, cfg: ModelConfig) -> tuple[int, ...]:
        """The stacked axes our array has in front of the HF tensor's: [layers of its stack] for "{i}", then [E] for
        "{e}"."""
        layers = (len(self.layers(cfg)),) if "{i}" in self.hf else ()
        return layers + ((cfg.n_experts,) if "{e}" in self.hf else ())

    def layers(self, cfg: ModelConfig) -> tuple[int, ...]:
        """The HF layer index of each of this row's stacked layers (its decoder stack's: ModelConfig.stack_layers)."""
        return cfg.stack_layers(self.path[0]) if "{i}" in self.hf else ()

    def names(self, cfg: ModelConfig) -> list[str]:
        """Every HF name of this row, row-major over `lead` (the stack's first layer's experts first)."""
        if "{i}" not in self.hf:
            return [self.hf]
        if "{e}" not in self.hf:
            return [self.hf.format(i=i) for i in self.layers(cfg)]
        return [self.hf.format(i=i, e=e) for i in self.layers(cfg) for e in range(cfg.n_experts)]


_L = "model.layers.{i}."


def _layer_rows(stack: str, when: Callable[[ModelConfig], bool]) -> tuple[HFTensor, ...]:
    """The rows of one decoder stack's layers (models.config.STACKS): attention and norms, then the feed-forward,
    dense (`mlp.{gate,up,down}_proj`) or a mixture of experts (the router, HF's `mlp.gate` [E, D], and each
    expert's SwiGLU, stacked [layers, E, ...] here). `when`: whether the config has this stack."""
    moe = lambda c: stack == "blocks" and c.is_moe  # noqa: E731 - `dense_blocks` are a MoE model's dense layers
    both = lambda extra: (lambda c: when(c) and extra(c))  # noqa: E731
    return (
        HFTensor(_L + "input_layernorm.weight", (stack, "attn_norm", "scale"), False, when),
        HFTensor(_L + "post_attention_layernorm.weight", (stack, "mlp_norm", "scale"), False, when),
        *(HFTensor(_L + f"self_attn.{p}_proj.weight", (stack, "attn", p, "kernel"), True, when) for p in "qkvo"),
        *(HFTensor(_L + f"self_attn.{p}_proj.bias", (stack, "attn", p, "bias"), False, both(lambda c: c.qkv_bias))
          for p in "qkv"),
        *(HFTensor(_L + f"self_attn.{p}_norm.weight", (stack, "attn", f"{p}_norm", "scale"), False,
                   both(lambda c: c.qk_norm)) for p in "qk"),
        *(HFTensor(_L + f"mlp.{p}_proj.weight", (stack, "mlp", p, "kernel"), True, both(lambda c: not moe(c)))
          for p in ("gate", "up", "down")),
        HFTensor(_L + "mlp.gate.weight", (stack, "mlp", "router"), True, both(moe)),
        *(HFTensor(_L + f"mlp.experts.{{e}}.{p}_proj.weight", (stack, "mlp", p), True, both(moe))
          for p in ("gate", "up", "down")),
    )


HF_TABLE: tuple[HFTensor, ...] = (
    HFTensor("model.embed_tokens.weight", ("embed",)),
    HFTensor("model.norm.weight", ("final_norm", "scale")),
    HFTensor("lm_head.weight", ("lm_head", "kernel"), True, lambda c: not c.tie_embeddings),
    *_layer_rows("blocks", lambda c: True),
    *_layer_rows("dense_blocks", lambda c: bool(c.dense_layers)),
)


def table(cfg: ModelConfig) -> list[HFTensor]:
    return [t for t in HF_TABLE if t.when(cfg)]


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of this config -> its HF shape (used by init-model and checks)."""
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    out = {}
    for t in table(cfg):
        shape = _get(abstract, t.path).shape[len(t.lead(cfg)):]
        shape = tuple(reversed(shape)) if t.transpose else tuple(shape)
        out.update((name, shape) for name in t.names(cfg))
    return out


def _get(state, path):
    for k in path:
        state = state[k]
    return state


# A MoE layer's experts in the fused layout (newer checkpoints): gate_up_proj [E, 2I, D] (gate rows first) and
# down_proj [E, D, I], read as the per-expert tensors of the hub layout (`_Shards.alias_fused_experts`).
_FUSED = re.compile(r"^(?P<layer>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<p>gate|up|down)_proj\.weight$")


class _Shards:
    """Name -> file index over one or more safetensors files; opens lazily, reads one tensor (or a slice of one) at
    a time, counting the bytes it read (`bytes_read`). A name can be an alias of a block of a stored tensor
    (`aliases`: name -> (stored name, index of the expert, row range)), which reads only that block."""

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
        self.aliases: dict[str, tuple[str, int, tuple[int, int] | None]] = {}
        self.bytes_read = 0

    def alias_fused_experts(self, names: list[str]) -> None:
        """Per-expert names that the files hold only fused: read them as blocks of the fused tensors."""
        for name in names:
            m = _FUSED.match(name)
            if name in self.where or m is None:
                continue
            e, proj = int(m["e"]), m["p"]
            fused = f"{m['layer']}.{'down_proj' if proj == 'down' else 'gate_up_proj'}"
            if fused not in self.where:
                continue  # neither layout: reported as the missing per-expert name
            rows = None
            if proj != "down":
                width = self._file(fused).get_slice(fused).get_shape()[1] // 2
                rows = (0, width) if proj == "gate" else (width, 2 * width)
            self.aliases[name] = (fused, e, rows)

    def _file(self, name: str):
        f = self.where.get(name)
        if f is None:
            raise WeightsError(f"missing weight tensor '{name}' in {sorted(set(map(str, self.where.values())))}")
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="numpy")
        return self._open[f]

    def read(self, name: str) -> np.ndarray:
        if name in self.aliases:
            return self.read_slice(name, (slice(None),) * len(self.shape(name)))
        x = self._file(name).get_tensor(name)
        self.bytes_read += x.nbytes
        return x

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.aliases:
            stored, _, rows = self.aliases[name]
            shape = tuple(self._file(stored).get_slice(stored).get_shape())[1:]
            return shape if rows is None else (rows[1] - rows[0], *shape[1:])
        return tuple(self._file(name).get_slice(name).get_shape())

    def read_slice(self, name: str, idx: tuple[slice, ...]) -> np.ndarray:
        if name in self.aliases:
            stored, e, rows = self.aliases[name]
            shape = self.shape(name)
            idx = tuple(idx) + (slice(None),) * (len(shape) - len(idx))
            if rows is not None:  # the block's rows, then the requested rows within them
                start, stop, step = idx[0].indices(shape[0])
                if step != 1:
                    raise WeightsError(f"strided read of '{name}' (an alias of '{stored}') is not supported")
                idx = (slice(rows[0] + start, rows[0] + stop),) + idx[1:]
            x = self._file(stored).get_slice(stored)[(slice(e, e + 1),) + idx][0]
        else:
            x = self._file(name).get_slice(name)[idx]
        self.bytes_read += x.nbytes
        return x


def load_decoder(model_dir: str | Path, *, dtype=jnp.float32, param_dtype=None, shardings_fn=None,
                 moe_impl: str = "auto") -> Decoder:
    """Build a Decoder from a local HF directory.

    `param_dtype` (default: `dtype`) is the storage dtype of the base weights; `moe_impl`: Decoder's.
    `shardings_fn(state) -> pytree of Sharding` places each tensor as it is read (None: default device); with it,
    each process reads only the slices its own devices hold (a mesh over several hosts never loads the whole
    model on one), and logs how much that was.
    """
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    param_dtype = param_dtype or dtype
    make = lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype, moe_impl=moe_impl)
    abstract = nnx.eval_shape(make)
    graphdef, base_state = nnx.split(abstract, nnx.Param)
    base_sh = shardings_fn(base_state) if shardings_fn else None
    shards = _Shards(model_dir)
    shards.alias_fused_experts([n for t in table(cfg) if "{e}" in t.hf for n in t.names(cfg)])
    pure = base_state.to_pure_dict()
    # One [L, ...] array per weight role in its stored layout (a host buffer, or with a placement each device's
    # block read alone), then one program per role transposes and casts it on the device (_finish). Per-tensor
    # device ops compiled a small program per shape (the 0.6B shape took 9 s on a CPU); numpy's own transposes
    # and bf16 casts were the next largest cost.
    total = 0
    for t in table(cfg):
        target = _get(base_state, t.path)
        lead, names = t.lead(cfg), t.names(cfg)
        want = tuple(target.shape[len(lead):])
        stored = tuple(reversed(want)) if t.transpose else want  # HF layout
        for name in names:
            if shards.shape(name) != stored:
                raise WeightsError(f"{model_dir}: tensor '{name}' has shape {shards.shape(name)}, expected {stored}")
        sh = _get(base_sh, t.path) if base_sh is not None else None
        if sh is None:
            buf = _read_whole(shards, names, lead)
            _set(pure, t.path, _to_device(buf, t.transpose, np.dtype(param_dtype)))
        else:
            buf = _read_placed(shards, names, lead, _layout(sh, t.transpose, target.ndim))
            _set(pure, t.path, _finish(buf, transpose=t.transpose, dtype=np.dtype(param_dtype), out_sharding=sh))
        total += buf.nbytes
    base_state.replace_by_pure_dict(pure)
    if base_sh is not None:
        log.info("%s: this process read %d of the weights' %d bytes (the shards its devices hold)", model_dir.name,
                 shards.bytes_read, total)
    return nnx.merge(graphdef, base_state)


def _read_whole(shards: _Shards, names: list[str], lead: tuple[int, ...]) -> np.ndarray:
    """Every tensor of one role, as stored, stacked over `lead` ([L, ...] for per-layer roles, [L, E, ...] for
    experts): one host buffer."""
    buf = None  # stored dtype and layout: numpy's transposes and bf16 casts are slow, the device's are not
    for i, name in enumerate(names):
        x = shards.read(name)
        if buf is None:
            buf = np.empty((*lead, *x.shape), x.dtype)
        buf[np.unravel_index(i, lead) if lead else ...] = x
    return buf


def _read_placed(shards: _Shards, names: list[str], lead: tuple[int, ...], sharding) -> jax.Array:
    """One role as a global array in its stored layout, placed by `sharding`: each device's block is read from the
    files alone (the slices of its layers and experts), once per distinct block, so a process reads only what its
    devices hold."""
    shape = lead + shards.shape(names[0])
    index = np.arange(len(names)).reshape(lead) if lead else None  # lead position -> position in `names`
    blocks: dict[tuple, np.ndarray] = {}  # devices holding the same block (replicas) share one read

    def block(idx: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in idx)
        if key not in blocks:
            if lead:
                which, rest = index[tuple(idx[:len(lead)])], tuple(idx[len(lead):])
                parts = [shards.read_slice(names[i], rest) for i in which.reshape(-1)]
                blocks[key] = np.stack(parts).reshape(*which.shape, *parts[0].shape)
            else:
                blocks[key] = shards.read_slice(names[0], tuple(idx))
        return blocks[key]

    return jax.make_array_from_callback(shape, sharding, block)


def _layout(sharding, transpose: bool, ndim: int):
    """The placement of a role in its stored (HF) layout: the target's, with the last two axes swapped when the
    stored tensor is transposed (the transpose then runs on each device, `_finish`)."""
    if not transpose:
        return sharding
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[:-2], spec[-1], spec[-2]))


def _to_device(buf: np.ndarray, transpose: bool, dtype: np.dtype) -> jax.Array:
    """Host buffer in HF layout (last two axes [out, in]) -> device array [.., in, out] in `dtype` on the default
    device; the transpose and cast run on the device, one program per role."""
    x = jnp.asarray(buf)
    return x if not transpose and buf.dtype == dtype else _finish(x, transpose=transpose, dtype=dtype,
                                                                   out_sharding=None)


@functools.partial(jax.jit, static_argnames=("transpose", "dtype", "out_sharding"))
def _finish(x, *, transpose, dtype, out_sharding):
    y = (jnp.swapaxes(x, -1, -2) if transpose else x).astype(dtype)
    return jax.lax.with_sharding_constraint(y, out_sharding) if out_sharding is not None else y


def _set(d: dict, path, value):
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def iter_hf_tensors(model: Decoder) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, numpy array in HF layout) for every base weight: the inverse of load_decoder. Streams: one
    tensor (one layer's) comes to the host at a time, gathered from wherever its shards are (on several processes
    every process iterates alike: the gathers are collectives)."""
    cfg = model.cfg
    state = nnx.state(model, nnx.Param)
    for t in table(cfg):
        x = _get(state, t.path)[...]
        names = iter(t.names(cfg))
        for part in (x if t.lead(cfg) else (x,)):  # one layer (all its experts) or the whole tensor at a time
            part = distributed.fetch(part)
            for one in (part if len(t.lead(cfg)) == 2 else (part,)):
                yield next(names), (one.T if t.transpose else one)
