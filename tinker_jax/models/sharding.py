"""Device mesh and logical-axis rules.

Every parameter names its logical axes at construction (NNX metadata `axes`). A rule table maps logical
axes to mesh axes; FSDP and tensor parallelism are entries of one table, not separate code paths.
Stacked layers add leading axes that are never sharded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tinker_jax.models.lora import axes as lora_axes

MESH_AXES = ("data", "expert", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes); absent or None means replicated.
DEFAULT_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    # activations: rows split over data, expert and fsdp (outside MoE layers the expert axis is data parallel)
    "batch": ("data", "expert", "fsdp"),
    # expert parallelism: a MoE layer's experts split over the expert axis. The grouped matmul then runs each
    # device's own experts on the layer's tokens (XLA gathers the tokens and sums the partial outputs).
    "expert": "expert",
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
}


@dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    @property
    def size(self) -> int:
        return self.data * self.expert * self.fsdp * self.tensor

    @staticmethod
    def from_dict(d: Mapping | None) -> "MeshConfig":
        d = dict(d or {})
        unknown = set(d) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh: unknown axes {sorted(unknown)}; known: {list(MESH_AXES)}")
        return MeshConfig(**{k: int(v) for k, v in d.items()})


def make_mesh(mc: MeshConfig, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if mc.size > len(devices):
        raise ValueError(f"mesh: data*expert*fsdp*tensor = {mc.size} but only {len(devices)} devices are visible")
    grid = np.array(devices[: mc.size]).reshape(*(getattr(mc, a) for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)


def spec_for(axes: tuple, shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES) -> P:
    """PartitionSpec for an array of `shape` whose trailing dims carry logical `axes`.

    A dim that its mesh axes do not divide stays replicated rather than failing (e.g. 2 kv heads on tp=4).
    """
    lead = len(shape) - len(axes)  # stacked [L] (or other leading) dims: never sharded
    out = [None] * lead
    used: set[str] = set()
    for dim, name in zip(shape[lead:], axes):
        mesh_axes = rules.get(name) if name else None
        if mesh_axes is None:
            out.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        n = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or dim % n:
            out.append(None)
            continue
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    while out and out[-1] is None:  # the canonical form jit gives its outputs: equal specs, no recompiles
        out.pop()
    return P(*out)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
    """A pytree of NamedSharding matching an nnx.State (or a pure pytree of Variables)."""
    def one(v):
        axes = v.get_metadata().get("axes", ()) if _is_var(v) else ()
        value = v.get_value() if _is_var(v) else v  # not v[...]: abstract (ShapeDtypeStruct) values too
        return NamedSharding(mesh, spec_for(tuple(axes), tuple(value.shape), mesh, rules))

    return jax.tree.map(one, state, is_leaf=_is_var)


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
    """Rows over the batch mesh axes, everything else replicated."""
    b = rules["batch"]
    return NamedSharding(mesh, P(b, *([None] * (ndim - 1))))


def rows_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading (row) axis over the batch mesh axes, every other axis replicated (any rank >= 1)."""
    return NamedSharding(mesh, P(rules["batch"]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def pool_shardings(pool: dict, mesh: Mesh, rules=DEFAULT_RULES) -> dict:
    """Shardings of LoRA weights {projection: {"a", "b"}} (any leading [L] / slot axes unsharded): `a` follows its
    base kernel's input axis, `b` its output axis (models.lora.axes)."""
    return {n: {k: NamedSharding(mesh, spec_for(lora_axes(n)[k], tuple(x.shape), mesh, rules)) for k, x in w.items()}
            for n, w in pool.items()}


def rules_key(rules=DEFAULT_RULES) -> tuple:
    """A hashable form of a rule table (part of cache keys of programs compiled for a placement)."""
    return tuple(sorted((k, v) for k, v in rules.items()))


def batch_shards(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """How many pieces the batch mesh axes cut a row axis into (data * expert * fsdp under DEFAULT_RULES)."""
    b = rules.get("batch")
    axes = (b,) if isinstance(b, str) else tuple(b or ())
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def cache_sharding(shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """A KV cache k or v [L,B,S,K,H]: rows B over the batch mesh axes, kv heads K over their rule's axis (tensor),
    each only where it divides (spec_for's rule: 2 kv heads on tensor=4 stay replicated); L, S and H unsharded."""
    return NamedSharding(mesh, spec_for(("batch", None, "kv_heads", "head_dim"), shape, mesh, rules))


def kv_pool_sharding(shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """A paged KV pool k or v [L,n,Pn,page,K,H] (models.decoder.PagedKV): its n = batch-shards axis over the batch
    mesh axes (each shard's pages with its rows), kv heads K over tensor where they divide; the rest unsharded."""
    return NamedSharding(mesh, spec_for(("batch", None, None, "kv_heads", "head_dim"), shape, mesh, rules))


def from_host(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array placed by `sharding` from a host value that every process holds whole (each device gets
    its slice; works unchanged when the mesh spans several processes)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def zeros(shape: tuple[int, ...], dtype, sharding: NamedSharding) -> jax.Array:
    """Zeros created in place, each device writing its own shard: never whole on one device first (a KV cache
    that only fits spread over the mesh)."""
    return _zeros_fn(tuple(int(n) for n in shape), jnp.dtype(dtype), sharding)()


@functools.lru_cache(maxsize=256)
def _zeros_fn(shape: tuple[int, ...], dtype, sharding: NamedSharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)  # one program per shape and placement
