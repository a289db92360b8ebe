"""LoRA as data, and the one place where its math lives.

A run's adapter is a `LoraSpec` (rank, alpha, which projections) plus weights: per adapted projection `a` [in, R]
and `b` [R, out] (with a leading [L] for per-layer projections), y += scale * (x @ a) @ b, scale = alpha / R.
PEFT's initialisation: a ~ U(-1/sqrt(in), 1/sqrt(in)), b = 0, so a fresh adapter is an exact no-op.

Many runs share one base model: their adapters are stacked in slots, `[L, S, in, R]` per rank (slot 0 is a null
adapter of zeros with scale 0). A forward pass receives, per rank, a `LoraRows`: the stacked weights, the per-slot
scale of every projection `[S, P]` (0 where a run does not adapt that projection, which keeps the target modules
run data rather than graph structure) and, for a segment of the batch rows, which slot each row uses. Each row is
multiplied by its own adapter at its own rank:
- "uniform": every row of the segment uses one slot (one run alone): plain matmuls with that slot's weights;
- "gather": each row's weights are gathered ([n, in, R]) and applied with a batched matmul: cost and memory
  follow the row's own rank (training and prefill, where rows are long);
- "dense": every row against every slot, masked to its own (decode, where a row is one token and reading each
  resident adapter once beats gathering one copy per row).
`jax.lax.ragged_dot` would express the same grouping, but outside TPUs it lowers to a dense product over every
group (jax 0.10/0.11 on CPU and GPU), so a rank-R adapter would cost S * R.

Dimension legend: B rows, T tokens per row, S slots, R rank, L layers, P projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tinker_jax.errors import UserError
from tinker_jax.models.config import ModelConfig
from tinker_jax.models.grouped import grouped_matmul

# The hosted Tinker service uses a fixed lora_alpha of 32 for every rank (tinker-cookbook's
# hyperparam_utils assumes it when scaling learning rates), so the effective scale is 32 / rank.
TINKER_LORA_ALPHA = 32.0

ROLES = ("attn", "mlp", "unembed")
MODES = ("uniform", "gather", "dense")


@dataclass(frozen=True)
class Projection:
    """An adaptable projection: its name (PEFT's short module name without `_proj`), role and logical axes."""

    name: str
    role: str
    per_layer: bool
    axes: tuple[str, str]  # logical axes of the base kernel [in, out]

    def dims(self, cfg: ModelConfig, stack: str = "blocks") -> tuple[int, int]:
        D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
        F = cfg.d_expert if self.per_expert(cfg, stack) else F
        return {"q": (D, N * H), "k": (D, K * H), "v": (D, K * H), "o": (N * H, D), "gate": (D, F), "up": (D, F),
                "down": (F, D), "unembed": (D, V)}[self.name]

    def per_expert(self, cfg: ModelConfig, stack: str = "blocks") -> bool:
        """A mixture-of-experts layer's feed-forward projections exist once per expert, and so do their adapters
        (a leading [E] before the adapter's own dims; the router is not adapted). `stack`: the decoder's layer
        stack ("dense_blocks": a MoE model's dense layers)."""
        return cfg.is_moe and self.role == "mlp" and stack == "blocks"

    def stacks(self, cfg: ModelConfig) -> tuple[str, ...]:
        """The decoder stacks whose leaf pairs (LEAVES) this projection's adapter has: a projection that is not per
        layer (the unembedding) has the one pair "a"/"b"."""
        return ("blocks", "dense_blocks") if self.per_layer and cfg.dense_layers else ("blocks",)


PROJECTIONS: tuple[Projection, ...] = (
    Projection("q", "attn", True, ("embed", "heads")),
    Projection("k", "attn", True, ("embed", "kv_heads")),
    Projection("v", "attn", True, ("embed", "kv_heads")),
    Projection("o", "attn", True, ("heads", "embed")),
    Projection("gate", "mlp", True, ("embed", "mlp")),
    Projection("up", "mlp", True, ("embed", "mlp")),
    Projection("down", "mlp", True, ("mlp", "embed")),
    Projection("unembed", "unembed", False, ("embed", "vocab")),
)
BY_NAME = {p.name: p for p in PROJECTIONS}
NAMES = tuple(p.name for p in PROJECTIONS)
INDEX = {n: i for i, n in enumerate(NAMES)}


def parse_targets(targets: Iterable[str], field_name: str = "target_modules") -> tuple[str, ...]:
    """Projection names (PEFT's `q_proj`, `lm_head` and role names `attn`/`mlp` accepted) -> canonical order."""
    aliases = {"lm_head": "unembed", **{f"{n}_proj": n for n in NAMES}}
    out = set()
    for t in targets:
        t = aliases.get(t, t)
        if t in ROLES:
            out.update(p.name for p in PROJECTIONS if p.role == t)
        elif t in BY_NAME:
            out.add(t)
        else:
            raise UserError(f"{field_name}: unknown projection {t!r}; known: {', '.join(NAMES)} (or a role: "
                             f"{', '.join(ROLES)})")
    return tuple(n for n in NAMES if n in out)


@dataclass(frozen=True)
class LoraSpec:
    """One run's adapter configuration: rank, alpha and the adapted projections (`targets`, canonical order)."""

    rank: int
    alpha: float = TINKER_LORA_ALPHA
    targets: tuple[str, ...] = NAMES
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.rank, bool) or int(self.rank) != self.rank or int(self.rank) <= 0:
            raise UserError(f"rank: LoRA rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise UserError(f"lora_alpha: must be a positive number, got {self.alpha!r}")
        object.__setattr__(self, "rank", int(self.rank))
        # The seed is kept with the run (SQLite INTEGER, the checkpoint record): signed 64-bit, like the SDK's field.
        if not -(2**63) <= int(self.seed) < 2**63:
            raise UserError(f"lora_config.seed: must be a 64-bit integer, got {self.seed!r}")
        object.__setattr__(self, "targets", parse_targets(self.targets))
        if not self.targets:
            raise UserError("train_attn/train_mlp/train_unembed: at least one must be true (no projection would "
                             "be adapted)")

    @staticmethod
    def from_flags(rank: int, *, train_attn: bool = True, train_mlp: bool = True, train_unembed: bool = True,
                   alpha: float = TINKER_LORA_ALPHA, allowed: Sequence[str] = NAMES, seed: int = 0) -> "LoraSpec":
        """The SDK's role flags, restricted to the projections the server config allows."""
        roles = {"attn": train_attn, "mlp": train_mlp, "unembed": train_unembed}
        targets = [n for n in parse_targets(allowed) if roles[BY_NAME[n].role]]
        if not any(roles.values()):
            targets = []
        return LoraSpec(rank=rank, alpha=alpha, targets=tuple(targets), seed=seed)

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)

    def role_on(self, role: str) -> bool:
        return any(BY_NAME[n].role == role for n in self.targets)

    def scales(self) -> np.ndarray:
        """[P] float32: scale for adapted projections, 0 elsewhere (a pool slot's row of `scale`)."""
        return np.array([self.scale if n in self.targets else 0.0 for n in NAMES], np.float32)

    def to_meta(self) -> dict[str, Any]:
        return {"lora_rank": self.rank, "lora_alpha": self.alpha, "lora_targets": list(self.targets),
                "train_attn": self.role_on("attn"), "train_mlp": self.role_on("mlp"),
                "train_unembed": self.role_on("unembed"), "seed": self.seed}

    @staticmethod
    def from_meta(meta: Mapping[str, Any]) -> "LoraSpec":
        """From a checkpoint's (or run's) metadata; older checkpoints name roles only and use alpha 32."""
        targets = meta.get("lora_targets")
        if targets is None:
            targets = [r for r in ROLES if meta.get(f"train_{r}", True)]
        return LoraSpec(rank=int(meta["lora_rank"]), alpha=float(meta.get("lora_alpha") or TINKER_LORA_ALPHA),
                        targets=tuple(targets), seed=int(meta.get("seed") or 0))


# --------------------------------------------------------------------------------------------- weights


# The leaves of a per-layer projection's adapter in each decoder stack (models.config.STACKS): a MoE model with
# dense layers has a second pair, over those layers, with the dense feed-forward's shapes.
LEAVES = {"blocks": ("a", "b"), "dense_blocks": ("dense_a", "dense_b")}


def shapes(cfg: ModelConfig, rank: int, slots: int | None = None) -> dict[str, dict[str, tuple[int, ...]]]:
    """{projection: {"a": shape, "b": shape}}; `slots` inserts the slot axis after [L] (or first); a per-expert
    projection has [E] after those: [L, S, E, in, R]. Per-layer leaves cover their stack's layers
    (ModelConfig.stack_layers): "a"/"b" the `blocks` stack, "dense_a"/"dense_b" a MoE model's dense layers."""
    out = {}
    slot = () if slots is None else (slots,)
    for p in PROJECTIONS:
        out[p.name] = {}
        for stack in p.stacks(cfg):
            d_in, d_out = p.dims(cfg, stack)
            lead = ((len(cfg.stack_layers(stack)),) if p.per_layer else ()) + slot
            lead += (cfg.n_experts,) if p.per_expert(cfg, stack) else ()
            a, b = LEAVES[stack]
            out[p.name].update({a: (*lead, d_in, rank), b: (*lead, rank, d_out)})
    return out


def axes(name: str) -> dict[str, tuple]:
    """Logical axes of a projection's (trailing) adapter dims, per leaf: `a` follows the kernel's input, `b` its
    output."""
    i, o = BY_NAME[name].axes
    return {k: (i, None) if k.endswith("a") else (None, o) for pair in LEAVES.values() for k in pair}


def init_adapter(cfg: ModelConfig, spec: LoraSpec) -> dict[str, dict[str, jax.Array]]:
    """Fresh, seeded adapter weights (fp32) for every projection; projections `spec` does not adapt are zeros."""
    mask = tuple(n in spec.targets for n in NAMES)
    return _init_fn(cfg, spec.rank, mask)(seed_key(spec.seed))


_INIT_CACHE: dict = {}


def _init_fn(cfg: ModelConfig, rank: int, mask: tuple[bool, ...]):
    key = (cfg, rank, mask)
    if key not in _INIT_CACHE:  # one compiled initialiser per shape; the seed enters as a key
        def init(k):
            out = {}
            for i, p in enumerate(PROJECTIONS):
                s = shapes(cfg, rank)[p.name]
                out[p.name] = {}
                for j, stack in enumerate(p.stacks(cfg)):
                    la, lb = LEAVES[stack]
                    bound = 1.0 / math.sqrt(s[la][-2])
                    key = jax.random.fold_in(k, i) if j == 0 else jax.random.fold_in(jax.random.fold_in(k, i), j)
                    a = jax.random.uniform(key, s[la], jnp.float32, -bound, bound)
                    out[p.name].update({la: a if mask[i] else jnp.zeros_like(a), lb: jnp.zeros(s[lb], jnp.float32)})
            return out

        _INIT_CACHE[key] = jax.jit(init)
    return _INIT_CACHE[key]


def seed_key(seed: int) -> jax.Array:
    """A threefry key from all 64 bits of a seed. jax.random.key(seed) keeps only the low 32 bits when x64 is
    off, so seeds 2**40 and 0 would collide; for seeds below 2**32 this equals jax.random.key(seed)."""
    seed = int(seed) % 2**64
    return jax.random.wrap_key_data(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32), impl="threefry2x32")


def targeted(weights: Mapping[str, Any], spec: LoraSpec) -> dict[str, Any]:
    """Only the projections `spec` adapts (what checkpoints and exports hold)."""
    return {n: weights[n] for n in spec.targets}


def complete(weights: Mapping[str, Any], cfg: ModelConfig, rank: int) -> dict[str, Any]:
    """Every projection, zeros where `weights` has none (the inverse of `targeted`)."""
    out = {}
    for n, s in shapes(cfg, rank).items():
        out[n] = dict(weights[n]) if n in weights else {k: jnp.zeros(v, jnp.float32) for k, v in s.items()}
    return out


# --------------------------------------------------------------------------------------------- slots


def slot_axis(name: str) -> int:
    """Where the slot axis sits in a pool leaf of projection `name`: after [L] for per-layer projections."""
    return 1 if BY_NAME[name].per_layer else 0


def take_slots(pool: dict, slots: jax.Array) -> dict:
    """{proj: {"a", "b"}} pool leaves -> the same with only `slots` [k] along the slot axis."""
    return {n: {k: jnp.take(x, slots, axis=slot_axis(n)) for k, x in w.items()} for n, w in pool.items()}


def add_slots(pool: dict, slots: jax.Array, values: dict) -> dict:
    return {n: {k: _at(x, slots, slot_axis(n)).add(values[n][k]) for k, x in w.items()} for n, w in pool.items()}


def set_slots(pool: dict, slots: jax.Array, values: dict) -> dict:
    return {n: {k: _at(x, slots, slot_axis(n)).set(values[n][k]) for k, x in w.items()} for n, w in pool.items()}


def _at(x, slots, axis):
    return x.at[:, slots] if axis == 1 else x.at[slots]


def slots_first(tree: dict) -> dict:
    """Move each leaf's slot axis to the front ([L,k,...] -> [k,L,...]): one slot's adapter per leading index."""
    return {n: {k: jnp.moveaxis(x, slot_axis(n), 0) for k, x in w.items()} for n, w in tree.items()}


def slots_back(tree: dict) -> dict:
    return {n: {k: jnp.moveaxis(x, 0, slot_axis(n)) for k, x in w.items()} for n, w in tree.items()}


@partial(jax.jit, donate_argnums=(0,))
def put_slot(tree: dict, slot: jax.Array, values: dict) -> dict:
    """tree's slot `slot` <- values (one adapter, every projection of `tree`), in place (tree is donated)."""
    one = jnp.reshape(slot, (1,))
    return set_slots(tree, one, slots_back(jax.tree.map(lambda x: x[None].astype(tree_dtype(tree)), values)))


@jax.jit
def get_slot(tree: dict, slot: jax.Array) -> dict:
    """One slot's adapter (a copy) out of a stacked tree."""
    return jax.tree.map(lambda x: x[0], slots_first(take_slots(tree, jnp.reshape(slot, (1,)))))


def tree_dtype(tree: dict):
    return jax.tree.leaves(tree)[0].dtype


# --------------------------------------------------------------------------------------------- forward


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LoraRows:
    """The adapters of one rank for one forward pass and the batch rows that use them.

    weights: {projection: {"a": [S, in, R], "b": [S, R, out]}} inside the layer scan (a leading [L] outside it);
    scale [S, P]; slots [size] int32 (row `start + i` uses slot `slots[i]`). `start`, `size` and `mode` are
    static: a segment of rows [start, start + size) of every activation this pass computes.
    """

    weights: dict
    scale: jax.Array
    slots: jax.Array
    start: int = field(metadata=dict(static=True), default=0)
    size: int = field(metadata=dict(static=True), default=0)
    mode: str = field(metadata=dict(static=True), default="gather")

    def per_layer(self, stack: str = "blocks") -> dict:
        """The per-layer projections' weights over one decoder stack's layers, as {"a", "b"} each."""
        la, lb = LEAVES[stack]
        return {n: {"a": w[la], "b": w[lb]} for n, w in self.weights.items() if BY_NAME[n].per_layer}

    def with_weights(self, weights: dict) -> "LoraRows":
        return LoraRows(weights, self.scale, self.slots, self.start, self.size, self.mode)


def _delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array, slots: jax.Array, mode: str) -> jax.Array:
    """x [n,T,in], a [S,in,R], b [S,R,out], scale [S] -> delta [n,T,out] (each row with its own slot)."""
    dt = x.dtype
    a, b, scale = a.astype(dt), b.astype(dt), scale.astype(dt)
    n, T, d_in = x.shape
    if mode == "uniform":
        s = slots[0]
        y = (x.reshape(n * T, d_in) @ a[s]) @ b[s] * scale[s]
        return y.reshape(n, T, -1)
    if mode == "gather":
        h = jnp.einsum("nti,nir->ntr", x, a[slots])
        return jnp.einsum("ntr,nro->nto", h, b[slots]) * scale[slots][:, None, None]
    if mode == "dense":  # a slot index >= S selects nothing (a row without an adapter of this rank)
        w = jax.nn.one_hot(slots, a.shape[0], dtype=dt) * scale  # [n,S]: the row's own slot, scaled
        h = jnp.einsum("nti,sir->ntsr", x, a) * w[:, None, :, None]
        return jnp.einsum("ntsr,sro->nto", h, b)
    raise ValueError(f"lora mode: expected one of {MODES}, got {mode!r}")


def apply(y: jax.Array, x: jax.Array, lora: Sequence[LoraRows], name: str) -> jax.Array:
    """y [B,T,out] = x @ W (the base projection of x [B,T,in]) plus every rank's adapter on its rows."""
    p = INDEX[name]
    for c in lora:
        w = c.weights.get(name)
        if w is None or c.size == 0:
            continue
        whole = c.start == 0 and c.size == x.shape[0]
        xs = x if whole else x[c.start:c.start + c.size]
        d = _delta(xs, w["a"], w["b"], c.scale[:, p], c.slots, c.mode).astype(y.dtype)
        y = y + d if whole else y.at[c.start:c.start + c.size].add(d)
    return y


def apply_experts(y: jax.Array, xs: jax.Array, lora: Sequence[LoraRows], name: str, sizes: jax.Array,
                  rows: jax.Array, impl: str = "auto") -> jax.Array:
    """Per-expert adapters on a mixture-of-experts projection. xs [M,in]: the layer's (token, expert) assignments,
    grouped by expert (`sizes` [E] rows each, models.grouped); y [M,out] their base output; rows
    [M] the batch row of each assignment. Each assignment gets its row's adapter for its expert.

    One slot ("uniform"): two grouped matmuls with that slot's [E,in,R] and [E,R,out]. Several slots: every slot's
    A of an expert side by side ([E,in,S*R]), the row's own slot kept by a mask, then B ([E,S*R,out]): the
    "dense" mode of `_delta`, one grouped matmul each way."""
    p = INDEX[name]
    dt = xs.dtype
    for c in lora:
        w = c.weights.get(name)
        if w is None or c.size == 0:
            continue
        a, b = w["a"].astype(dt), w["b"].astype(dt)  # [S,E,in,R], [S,E,R,out]
        n_slots, n_experts, d_in, r = a.shape
        local = rows - c.start
        inside = ((local >= 0) & (local < c.size)).astype(dt)  # this rank's segment of the batch rows
        slot = c.slots[jnp.clip(local, 0, c.size - 1)]  # [M]
        scale = c.scale[:, p].astype(dt)
        if c.mode == "uniform":
            s = c.slots[0]
            h = grouped_matmul(xs, a[s], sizes, impl)
            d = grouped_matmul(h, b[s], sizes, impl) * (scale[s] * inside)[:, None]
        else:
            a_cat = jnp.transpose(a, (1, 2, 0, 3)).reshape(n_experts, d_in, n_slots * r)
            b_cat = jnp.transpose(b, (1, 0, 2, 3)).reshape(n_experts, n_slots * r, -1)
            keep = jax.nn.one_hot(slot, n_slots, dtype=dt) * scale * inside[:, None]  # [M,S]; slot >= S: none
            h = grouped_matmul(xs, a_cat, sizes, impl).reshape(-1, n_slots, r) * keep[:, :, None]
            d = grouped_matmul(h.reshape(-1, n_slots * r), b_cat, sizes, impl)
        y = y + d.astype(y.dtype)
    return y


def merged_delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """The dense weight update of one adapter, [in, out] = scale * a @ b in fp32 (merging and exports)."""
    return np.float32(scale) * (np.asarray(a, np.float32) @ np.asarray(b, np.float32))


@dataclass(frozen=True, eq=False)
class Adapter:
    """One run's adapter: its spec and weights {projection: {"a", "b"}} for exactly `spec.targets` (fp32, layer-
    stacked). Immutable by convention: a sampler snapshot holds one, and training never writes into it."""

    spec: LoraSpec
    weights: dict

    def __post_init__(self):
        if set(self.weights) != set(self.spec.targets):
            raise UserError(f"adapter weights cover {sorted(self.weights)}, the spec targets "
                             f"{list(self.spec.targets)}")

    def numpy(self) -> dict[str, dict[str, np.ndarray]]:
        return {n: {k: np.asarray(jax.device_get(v), np.float32) for k, v in w.items()}
                for n, w in self.weights.items()}


def rows_for(adapter: Adapter, n_rows: int) -> tuple[LoraRows, ...]:
    """One adapter applied to every row of an n-row batch (a one-slot stack): reference computations, exports."""
    w = {n: {k: jnp.expand_dims(jnp.asarray(x, jnp.float32), slot_axis(n)) for k, x in ab.items()}
         for n, ab in adapter.weights.items()}
    scale = jnp.asarray(adapter.spec.scales())[None]
    return (LoraRows(w, scale, jnp.zeros(n_rows, jnp.int32), 0, n_rows, "uniform"),)
