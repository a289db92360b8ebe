"""Training state on the device: adapter pools (LoRA runs) and private weight copies (full fine-tuning).

An `AdapterPool` holds every rank-R adapter trained on one base model, stacked over slots (models.lora): weights,
the gradient accumulator and Adam's moments, each `{projection: {"a": [L,S,in,R], "b": [L,S,R,out]}}` (unembed
without [L]), plus per slot its Adam step count [S] and projection scales [S,P]. Slot 0 is the null adapter
(zeros, scale 0): padding entries and rows without an adapter point at it, so it never changes. A run owns one
slot from `alloc` to `free`; a slot is zeroed whenever it changes hands, so nothing of an earlier run (weights,
stale gradients, moments) reaches the next. Pools grow by half up to `max_slots` (a new shape: the steps
recompile once). Every write is a jitted update of donated buffers: no copy of the pool per step.

Memory: a slot costs 4 x the adapter (weights, gradients, two moments, fp32), e.g. ~0.4 GB for a rank-32 adapter
on every projection of the Qwen3-0.6B shape. A step's temporaries are its activations (rows x tokens) plus a copy
of the adapters its rows use and their gradient, never the whole pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tinker_jax.errors import Overloaded
from tinker_jax.models import lora as lora_math
from tinker_jax.models.config import ModelConfig
from tinker_jax.models.lora import Adapter, LoraSpec, get_slot, put_slot, set_slots
from tinker_jax.models.sharding import pool_shardings, replicated, state_shardings

NULL_SLOT = 0


def _zeros(shapes: dict, shardings: dict) -> dict:
    return {n: {k: jax.device_put(jnp.zeros(s, jnp.float32), shardings[n][k]) for k, s in w.items()}
            for n, w in shapes.items()}


@partial(jax.jit, donate_argnums=(0,))
def _put_row(x: jax.Array, slot: jax.Array, value: jax.Array) -> jax.Array:
    return x.at[slot].set(value)


class AdapterPool:
    def __init__(self, cfg: ModelConfig, rank: int, mesh: Mesh, capacity: int = 4, max_slots: int = 64):
        self.cfg, self.rank, self.mesh = cfg, int(rank), mesh
        self.max_slots = int(max_slots)
        self.capacity = 0
        self.owner: list[str | None] = []
        self._allocate(max(2, min(int(capacity), self.max_slots)))

    # --- storage ----------------------------------------------------------------------------------------------

    def _allocate(self, capacity: int) -> None:
        """(Re)build the arrays with `capacity` slots, keeping every existing slot's contents."""
        shapes = lora_math.shapes(self.cfg, self.rank, capacity)
        sh = pool_shardings(shapes_tree(shapes), self.mesh)
        rep = replicated(self.mesh)
        fresh = {name: _zeros(shapes, sh) for name in ("weights", "grads", "mu", "nu")}
        count = jax.device_put(jnp.zeros(capacity, jnp.int32), rep)
        scale = jax.device_put(jnp.zeros((capacity, len(lora_math.NAMES)), jnp.float32), rep)
        if self.capacity:  # growing: copy the old slots in
            old = jnp.arange(self.capacity)
            for name in fresh:
                fresh[name] = set_slots(fresh[name], old, getattr(self, name))
            count, scale = count.at[: self.capacity].set(self.count), scale.at[: self.capacity].set(self.scale)
        self.weights, self.grads, self.mu, self.nu = (fresh[k] for k in ("weights", "grads", "mu", "nu"))
        self.count, self.scale = count, scale
        self.owner += [None] * (capacity - self.capacity)
        self.owner[NULL_SLOT] = "<null>"
        self.capacity = capacity

    def trees(self) -> tuple[dict, dict, dict, dict]:
        return self.weights, self.grads, self.mu, self.nu

    # --- slots --------------------------------------------------------------------------------------------------

    def alloc(self, run_id: str, spec: LoraSpec) -> int:
        """A zeroed slot for `run_id`, initialised with `spec`'s seeded adapter (Overloaded when full)."""
        free = [s for s in range(1, self.capacity) if self.owner[s] is None]
        if not free:
            if self.capacity >= self.max_slots:
                raise Overloaded(f"all {self.max_slots - 1} LoRA slots of rank {self.rank} on this base model are "
                                 "in use (unload a model, or raise max_lora_slots)", retry_after_s=30.0)
            # 1.5x: each growth is a new shape (the steps recompile once), and a pool's memory is 4 copies of
            # an adapter per slot, so doubling would leave up to half of it unused.
            self._allocate(min(self.capacity + max(2, self.capacity // 2), self.max_slots))
            free = [s for s in range(1, self.capacity) if self.owner[s] is None]
        slot = free[0]
        self.write(slot, spec, lora_math.targeted(lora_math.init_adapter(self.cfg, spec), spec))
        self.owner[slot] = run_id  # only once its adapter is in place: a failed write leaves the slot free
        return slot

    def free(self, slot: int) -> None:
        self._zero(slot)
        self.owner[slot] = None

    def _zero(self, slot: int) -> None:
        s = jnp.int32(slot)
        zero = jax.tree.map(jnp.zeros_like, get_slot(self.weights, s))
        self.weights, self.grads, self.mu, self.nu = (put_slot(t, s, zero) for t in self.trees())
        self.count = _put_row(self.count, s, jnp.int32(0))
        self.scale = _put_row(self.scale, s, jnp.zeros(len(lora_math.NAMES), jnp.float32))

    def write(self, slot: int, spec: LoraSpec, weights: dict, opt: dict | None = None) -> None:
        """Slot <- an adapter (only `spec.targets`; other projections become zeros) and optionally its Adam state
        (mu, nu like weights, count); gradients are cleared."""
        if spec.rank != self.rank:
            raise AssertionError(f"rank {spec.rank} adapter written into the rank {self.rank} pool")
        s = jnp.int32(slot)
        full = lambda tree: lora_math.complete(tree, self.cfg, self.rank)  # noqa: E731
        self.weights = put_slot(self.weights, s, full(weights))
        zero = jax.tree.map(jnp.zeros_like, full(weights))
        self.grads = put_slot(self.grads, s, zero)
        self.mu = put_slot(self.mu, s, zero if opt is None else full(opt["mu"]))
        self.nu = put_slot(self.nu, s, zero if opt is None else full(opt["nu"]))
        self.count = _put_row(self.count, s, jnp.int32(0 if opt is None else int(opt["count"])))
        self.scale = _put_row(self.scale, s, jnp.asarray(spec.scales()))

    def read(self, slot: int, spec: LoraSpec) -> Adapter:
        """A private copy of the slot's adapter (training never writes into it)."""
        return Adapter(spec, lora_math.targeted(get_slot(self.weights, jnp.int32(slot)), spec))

    def read_grads(self, slot: int, spec: LoraSpec) -> dict:
        return lora_math.targeted(get_slot(self.grads, jnp.int32(slot)), spec)

    def read_opt(self, slot: int, spec: LoraSpec) -> dict:
        s = jnp.int32(slot)
        return {"mu": lora_math.targeted(get_slot(self.mu, s), spec), "nu": lora_math.targeted(get_slot(self.nu, s), spec),
                "count": jnp.asarray(self.count[slot])}

    def in_use(self) -> int:
        return sum(o is not None for o in self.owner[1:])

    def zero_grads(self, slots) -> None:
        """Clear the gradient accumulators of `slots` (after a failed step left part of a batch in them)."""
        zero = jax.tree.map(jnp.zeros_like, get_slot(self.grads, jnp.int32(0)))
        for s in slots:
            self.grads = put_slot(self.grads, jnp.int32(s), zero)

    def deleted(self) -> bool:
        """Whether a failed call consumed (donated) buffers of this pool: its contents are gone."""
        return any(x.is_deleted() for x in jax.tree.leaves((self.weights, self.grads, self.mu, self.nu,
                                                              self.count, self.scale)))


def shapes_tree(shapes: dict) -> dict:
    """{proj: {"a": shape}} -> the same with ShapeDtypeStructs (what pool_shardings reads)."""
    return {n: {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in w.items()} for n, w in shapes.items()}


@dataclass
class FullState:
    """A full fine-tuning run: a private fp32 copy of every weight, its gradient accumulator and Adam state."""

    params: nnx.State
    grads: nnx.State
    mu: nnx.State
    nu: nnx.State
    count: jax.Array

    @staticmethod
    def create(base_params: nnx.State, mesh: Mesh) -> "FullState":
        # Always a private copy: optim steps donate it, and it must never alias the shared base model's arrays.
        sh = state_shardings(base_params, mesh)
        params = jax.device_put(jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), base_params), sh)
        zeros = lambda: jax.device_put(jax.tree.map(jnp.zeros_like, params), sh)  # noqa: E731
        count = jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh))
        return FullState(params, zeros(), zeros(), zeros(), count)

    def opt(self) -> dict:
        return {"mu": self.mu.to_pure_dict(), "nu": self.nu.to_pure_dict(), "count": self.count}

    def set(self, params: Any, opt: dict | None) -> None:
        """Weights (a pure dict) and optionally the Adam state; without it Adam starts afresh."""
        self.params.replace_by_pure_dict(params)
        self.grads = jax.tree.map(jnp.zeros_like, self.grads)
        if opt is None:
            self.mu, self.nu = (jax.tree.map(jnp.zeros_like, self.grads) for _ in range(2))
            self.count = jnp.zeros_like(self.count)
        else:
            self.mu.replace_by_pure_dict(opt["mu"])
            self.nu.replace_by_pure_dict(opt["nu"])
            # From the host (a global sharding on several processes takes host values, not one device's array).
            self.count = jax.device_put(np.asarray(opt["count"], np.int32), self.count.sharding)


@dataclass
class Run:
    """One training run (a Tinker training client's model) as the device side knows it."""

    run_id: str
    base: str
    spec: LoraSpec | None  # None: full fine-tuning
    slot: int | None = None  # LoRA: its slot in the rank's pool
    full: FullState | None = None
    step: int = 0  # optimizer steps taken
    pending: int = 0  # forward_backward calls accumulated since the last optimizer step
    meta: dict = field(default_factory=dict)  # its configuration as checkpoints record it (base model, LoRA spec)
    owner: str | None = None  # tag of the API key that created it (server); None: in-process
    created: float = 0.0
    user_metadata: dict = field(default_factory=dict)
    grads_lost: str | None = None  # why the accumulated gradient was dropped (a failed step); the next optim fails

    @property
    def is_lora(self) -> bool:
        return self.spec is not None

    @property
    def optimizer(self) -> str:
        """training.optim.OPTIMIZERS: fixed when the run is created (a checkpoint records it)."""
        return self.meta.get("optimizer", "adamw")

