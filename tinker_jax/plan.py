"""Memory plan: bytes per device of one base model's training and sampling state, from `config.json` alone.

`plan(cfg, mesh, ...) -> Plan` reads no weights and needs no devices, so a 2-core laptop can plan Llama-3-405B on
64 chips. What it counts, per device:

- exact array sizes, from the project's own code: the real `Decoder` built under `nnx.eval_shape` (abstract
  values with their logical axes), placed by `models.sharding.state_shardings` / `pool_shardings` on a
  `jax.sharding.AbstractMesh`, so a dim is split over its mesh axes only where the rule table says so and the
  size divides (else replicated), exactly as the engine will place it. Parameters (base model, engine `dtype`),
  trainable weights (LoRA: the rank's `AdapterPool`, every slot of its capacity; full: the run's fp32 copy),
  gradient accumulators, Adam's two fp32 moments, the sampler's KV cache and its adapter table / snapshot.
- estimates, with the formula written in `_activations` / `_workspace`: activations kept for the backward pass
  (with and without remat) and the transient buffers of one step (a layer's weights gathered over fsdp, the
  logits chunk), and the sampler's largest call (`sampler_transients`: a prefill, a long prompt's chunk or a
  decode step). XLA's own scheduling can move these either way; the plan says which lines are estimates.

The CLI (`tinker-jax plan`) only formats a `Plan`; `Plan.to_dict()` is its `--json`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tinker_jax.models.config import STACKS, ConfigError, ModelConfig, config_from_hf, load_config

PLAN_AXES = ("data", "fsdp", "tensor", "expert")  # models.sharding.MESH_AXES' axes, in --mesh's order
DTYPES = {"float32": 4, "bfloat16": 2}
ATTENTIONS = ("einsum", "cudnn", "xla")
FP32 = 4
TIGHT = 0.10  # under this share of device memory left: "tight" (XLA's temporaries and fragmentation are not counted)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class PlanError(ValueError):
    """Bad planning input; the message starts with the flag (e.g. `--mesh: ...`). A ValueError, so `tinker-jax`
    prints it and exits 2."""


# ---------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class PlanMesh:
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor * self.expert

    @property
    def batch_shards(self) -> int:
        """How many ways the rows of a micro-batch are split (rules: batch -> (data, expert, fsdp))."""
        return self.data * self.expert * self.fsdp

    def abstract(self, **override: int):
        """An AbstractMesh of these sizes: shardings and shard shapes without any device."""
        from jax.sharding import AbstractMesh

        sizes = {**asdict(self), **override}
        return AbstractMesh(tuple(sizes[a] for a in PLAN_AXES), PLAN_AXES)

    def __str__(self) -> str:
        return ",".join(f"{a}={getattr(self, a)}" for a in PLAN_AXES)


def parse_mesh(text: str | None) -> PlanMesh:
    """"data=1,fsdp=8,tensor=1[,expert=1]" -> PlanMesh; omitted axes are 1."""
    if text is None or not text.strip():
        return PlanMesh()
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq:
            raise PlanError(f"--mesh: expected AXIS=SIZE, got {part.strip()!r} (e.g. data=1,fsdp=8,tensor=1)")
        if name not in PLAN_AXES:
            raise PlanError(f"--mesh: unknown axis {name!r}; known: {', '.join(PLAN_AXES)}")
        if name in sizes:
            raise PlanError(f"--mesh: axis {name!r} given twice")
        try:
            n = int(value)
        except ValueError:
            raise PlanError(f"--mesh: {name}={value.strip()!r} is not an integer") from None
        if n < 1:
            raise PlanError(f"--mesh: {name}={n} must be >= 1")
        sizes[name] = n
    return PlanMesh(**sizes)


def parse_bytes(text: str | int | None, flag: str = "--device-memory") -> int | None:
    """"80GiB", "16 GiB", "80GB", "8e10", 1234 -> bytes (GB = 10^9, GiB = 2^30)."""
    if text is None:
        return None
    if isinstance(text, int):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = m and m.group(2).lower()
        if not m or unit not in _UNITS:
            raise PlanError(f"{flag}: expected a size such as 80GiB, 16GiB or 80GB, got {text!r}")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise PlanError(f"{flag}: must be positive, got {text!r}")
    return n


def read_config(path: str | Path) -> ModelConfig:
    """A model directory or a config.json file -> ModelConfig (the engine's own parser; never reads weights)."""
    p = Path(path)
    if p.is_dir():
        return load_config(p)
    if not p.is_file():
        raise PlanError(f"MODEL: {path} is neither a model directory nor a config.json file")
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: malformed JSON ({e})") from None
    return config_from_hf(d, source=str(p))


# ---------------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class Line:
    name: str
    bytes: int  # per device (the busiest one where placement is uneven)
    note: str
    exact: bool  # an array size (True) or an estimate (False)


@dataclass(frozen=True)
class Plan:
    model: str  # architecture (family)
    n_params: int
    trainable_params: int  # full: every weight; LoRA: one adapter (every projection, as a pool slot stores it)
    mesh: PlanMesh
    mode: str  # "lora" | "full"
    lora_rank: int | None
    adapters: int  # LoRA runs of this rank (pool slots in use)
    pool_slots: int  # the pool's capacity for `adapters` runs (slot 0 is the null adapter); 0 for full
    dtype: str  # engine `dtype`: base weights stored and computed in it
    remat: bool
    attention: str
    batch_tokens: int
    seq_len: int  # row length (a length bucket)
    rows: int  # rows of one micro-batch (padded to the batching's buckets)
    tokens_per_device: int
    lines: tuple[Line, ...]
    activations_no_remat: int
    activations_remat: int
    total: int
    device_memory: int | None
    notes: tuple[str, ...] = ()
    replicated: tuple[str, ...] = ()  # dims the rules would shard but that stay replicated (not divisible)
    params_per_device: int = 0  # parameter count on one device

    @property
    def free(self) -> int | None:
        return None if self.device_memory is None else self.device_memory - self.total

    @property
    def verdict(self) -> str | None:
        """"fits" | "tight" (under 10% left) | "does not fit"; None without a device memory."""
        if self.device_memory is None:
            return None
        if self.total > self.device_memory:
            return "does not fit"
        return "tight" if self.free < TIGHT * self.device_memory else "fits"

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def line(self, name: str) -> Line:
        return next(x for x in self.lines if x.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "n_params": self.n_params, "params_per_device": self.params_per_device,
            "trainable_params": self.trainable_params,
            "mesh": asdict(self.mesh), "devices": self.mesh.devices, "mode": self.mode, "lora_rank": self.lora_rank,
            "adapters": self.adapters, "pool_slots": self.pool_slots, "dtype": self.dtype, "remat": self.remat,
            "attention": self.attention, "batch_tokens": self.batch_tokens, "seq_len": self.seq_len,
            "rows": self.rows, "tokens_per_device": self.tokens_per_device,
            "per_device_bytes": {x.name: x.bytes for x in self.lines},
            "lines": [asdict(x) for x in self.lines],
            "activations_bytes": {"no_remat": self.activations_no_remat, "remat": self.activations_remat},
            "total_bytes": self.total, "device_memory_bytes": self.device_memory, "free_bytes": self.free,
            "fits": self.fits, "verdict": self.verdict, "notes": list(self.notes), "replicated": list(self.replicated),
        }


# ---------------------------------------------------------------------------------------------------- sizes


def _nbytes(shape, itemsize: int) -> int:
    return math.prod(shape) * itemsize


@functools.lru_cache(maxsize=8)
def _abstract_params(cfg: ModelConfig, dtype: str):
    """The real Decoder's nnx.Param state, abstract (ShapeDtypeStructs carrying `axes`): nothing allocated. Cached
    (a ModelConfig hashes by value): plans of one model on several meshes trace the decoder once."""
    import jax.numpy as jnp
    from flax import nnx

    from tinker_jax.models.decoder import Decoder

    jdt = jnp.dtype(dtype)
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=jdt, dtype=jdt))
    return nnx.split(model, nnx.Param)[1]


def _param_table(state, amesh) -> list[tuple[str, tuple, tuple, tuple]]:
    """[(path, axes, global shape, shard shape)] for every parameter, placed as the engine places it."""
    import jax
    from flax import nnx

    from tinker_jax.models.sharding import state_shardings

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    shardings = jax.tree.leaves(state_shardings(state, amesh))
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)[0]
    assert len(leaves) == len(shardings)
    out = []
    for (path, v), sh in zip(leaves, shardings):
        shape = tuple(v.get_value().shape)
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        out.append((name, tuple(v.get_metadata().get("axes", ())), shape, tuple(sh.shard_shape(shape))))
    return out


def _sampler_copy(table, itemsize: int, quantize: str | None) -> tuple[int, int]:
    """(per-device, whole) bytes of the sampler's copy of the weights in `table` at `itemsize`; with `quantize`
    (models.quant) the block projections' kernels and MoE experts take 1 byte a weight plus a scale per column."""
    from tinker_jax.models.quant import EXPERTS, QUANTIZED

    local = whole = 0
    for name, axes, shape, shard in table:
        parts = name.split(".")
        projection = parts[-1] == "kernel" and len(parts) > 1 and parts[-2] in QUANTIZED
        experts = parts[-1] in EXPERTS and "expert" in axes
        if quantize and (projection or experts):  # (lm_head's kernel is not a QUANTIZED projection's)
            local += math.prod(shard) + math.prod(shard[:-2] + shard[-1:]) * itemsize
            whole += math.prod(shape) + math.prod(shape[:-2] + shape[-1:]) * itemsize
        else:
            local += math.prod(shard) * itemsize
            whole += math.prod(shape) * itemsize
    return local, whole


def _replicated_dims(table, mesh: PlanMesh) -> list[str]:
    """Dims the rule table maps to mesh axes (of size > 1) that stay whole (spec_for: their size does not divide,
    or the mesh axis already splits another dim of the array)."""
    from tinker_jax.models.sharding import DEFAULT_RULES

    found: dict[tuple, list[str]] = {}
    for name, axes, shape, local in table:
        lead = len(shape) - len(axes)
        for i, ax in enumerate(axes):
            rule = DEFAULT_RULES.get(ax) if ax else None
            rule = (rule,) if isinstance(rule, str) else tuple(rule or ())
            want = tuple(a for a in rule if getattr(mesh, a) > 1)
            if want and local[lead + i] == shape[lead + i]:
                found.setdefault((ax, shape[lead + i], want), []).append(name)
    out = []
    for (ax, size, want), names in found.items():
        n = math.prod(getattr(mesh, a) for a in want)
        over = " x ".join(f"{a}={getattr(mesh, a)}" for a in want)
        why = f"is not divisible by {over}" if size % n else f"finds {over} taken by another dim"
        out.append(f"{ax} dim {size} {why}: replicated in {', '.join(sorted(names))}")
    return out


def pool_capacity(adapters: int, initial_slots: int, max_slots: int) -> int:
    """Slots an AdapterPool holds once `adapters` runs have one each (engine/pools.py: it starts at
    max(2, min(initial_slots, max_slots)) and grows by half, at least 2, up to max_slots; slot 0 is the null
    adapter)."""
    cap = max(2, min(initial_slots, max_slots))
    while cap - 1 < adapters and cap < max_slots:
        cap = min(cap + max(2, cap // 2), max_slots)
    return cap


def _adapter_bytes(cfg: ModelConfig, rank: int, slots: int | None, amesh, itemsize: int) -> int:
    """Per-device bytes of {proj: {a, b}} adapter weights with `slots` slots, placed as pool_shardings places a
    pool (`a` follows its kernel's input axis, `b` its output axis; the [L] and slot axes are never split)."""
    from tinker_jax.engine.pools import shapes_tree
    from tinker_jax.models import lora as lora_math
    from tinker_jax.models.sharding import pool_shardings

    shapes = lora_math.shapes(cfg, rank, slots)
    sh = pool_shardings(shapes_tree(shapes), amesh)
    return sum(_nbytes(sh[n][k].shard_shape(s), itemsize) for n, w in shapes.items() for k, s in w.items())


def micro_batch(batch_tokens: int, seq_len: int, batch_shards: int) -> tuple[int, int]:
    """(row length T, rows) of a full micro-batch as training.batching.plan builds it: rows bucketed to a power of
    two, at least `batch_shards` (the worker's row multiple, data x expert x fsdp), adding rows while the padded cost
    stays within max(budget, one bucket)."""
    from tinker_jax.training.batching import MIN_LEN, bucket

    T = bucket(seq_len, MIN_LEN)
    fit = max(1, batch_tokens // T)
    return T, bucket(1 << (fit.bit_length() - 1), batch_shards)  # the largest power of two within the budget


def default_seq_len(batch_tokens: int, batch_shards: int, max_seq_len: int) -> int:
    """One row per batch shard without padding: the largest power of two <= batch_tokens / (data x expert x fsdp),
    within [MIN_LEN, max_seq_len]."""
    from tinker_jax.training.batching import MIN_LEN

    per = max(1, batch_tokens // batch_shards)
    return max(MIN_LEN, min(1 << (per.bit_length() - 1), 1 << (max(1, max_seq_len).bit_length() - 1)))


def _split(dim: int, logical: str, amesh) -> int:
    """`dim`'s per-device size when it carries logical axis `logical` (rule table + divisibility)."""
    from jax.sharding import NamedSharding

    from tinker_jax.models.sharding import spec_for

    return NamedSharding(amesh, spec_for((logical,), (dim,), amesh)).shard_shape((dim,))[0]


@dataclass(frozen=True)
class Dims:
    """The per-device sizes the activation formula reads: D whole; nh = N*H, kh = K*H, f = F and v = V as their
    kernels' output dims split over tensor (rule table + divisibility); n = nh / H query heads (fractional when
    the N*H dim splits inside a head); k = kh / H; layer_w: one layer's matmul weights on this device (elements);
    adapter_w: one layer of one adapter (all seven per-layer projections, elements)."""

    D: int
    nh: int
    kh: int
    f: int
    v: int
    n: float
    k: float
    H: int
    qk_norm: bool
    layer_w: int
    adapter_w: int


def dims(cfg: ModelConfig, amesh, rank: int | None, layer_w: int) -> Dims:
    H = cfg.head_dim
    nh, kh = _split(cfg.n_heads * H, "heads", amesh), _split(cfg.n_kv_heads * H, "kv_heads", amesh)
    f = _split(cfg.d_ff, "mlp", amesh)
    adapter_w = (rank or 0) * (7 * cfg.d_model + 2 * nh + 2 * kh + 3 * f)
    return Dims(cfg.d_model, nh, kh, f, _split(cfg.vocab_size, "vocab", amesh), nh / H, kh / H, H, cfg.qk_norm,
                layer_w, adapter_w)


def residual_bytes(d: Dims, t: int, rows: int, T: int, b: int, *, mode: str, remat: bool, rank: int | None,
                   attention: str = "einsum", cast_weights: bool = False) -> tuple[float, float]:
    """-> (bytes per layer, bytes outside the layers) that autodiff keeps for the backward pass of one micro-batch
    on one device: t tokens in `rows` rows of T, compute dtype of b bytes. `mode`: "full" (every weight
    differentiated), or the LoRA mode training.batching picks ("uniform": the rows of one run; "gather": rows of
    several runs, each with its own adapter). Read off what models/decoder.py saves today; tests/test_plan.py
    compares it with jax's own list of saved residuals for the real step, so a decoder change shows up there.
    Elements per token (n = nh / H, k = kh / H):

    without remat, per layer:
      compute dtype  2nh + 2kh + 6f           grouped q and the attention output, k and v, six [t, f] MLP values
                     + 7D | 5D | 2D           matmul inputs (full | uniform | gather: only what the adapters need)
                     + nT                     attention probabilities
                     + 7R                     LoRA: x @ a of each per-layer projection
                     + nh + kh                Qwen3 q/k norm inputs (full fine-tuning only)
      fp32           2D + 4                   RMSNorm inputs and statistics
                     + nT + 2n                softmax output and statistics
                     + nh + kh + 2n + 2k      Qwen3 q/k norm
      and per layer, not per token: one adapter layer in the compute dtype (uniform; gather: one per row); in full
      fine-tuning computing in bf16 from fp32 weights, the layer's weights cast to bf16 (assumed placed like them).
      `attention="cudnn"` keeps no probabilities: nT(b + 4) + 8n bytes become the kernel's statistics, 4n (an
      assumption: the CPU that checks this formula has no cuDNN).
    with remat (dots_with_no_batch_dims_saveable), per layer, compute dtype: the layer input and its plain matmul
      outputs, 2D + nh + 2kh + 2f (full, gather); 3D + 2nh + 4kh + 4f + 7R (uniform: its adapter matmuls are
      plain dots too).
    outside the layers, bytes per token: 4D + 2bD (LoRA: 4D + bD) + 16 (final norm, hidden, positions, targets);
      without remat also 5nT (the attention mask broadcast over heads and its fp32 fill) and 4Hb (RoPE tables),
      with remat T (the [T, T] boolean mask of each row).
    """
    D, nh, kh, f, n, k = d.D, d.nh, d.kh, d.f, d.n, d.k
    r = 7 * rank if rank else 0
    scores = attention != "cudnn"
    hidden = (2 if mode == "full" else 1) * b * D  # LoRA steps keep one [t, D] copy fewer (the scan's output)
    if remat:
        if mode == "uniform":
            per_tok = b * (3 * D + 2 * nh + 4 * kh + 4 * f + r)
        else:
            per_tok = b * (2 * D + nh + 2 * kh + 2 * f)
        return t * per_tok, t * (T + 4 * D + hidden + 16)
    full = mode == "full"
    d_in = {"full": 7, "uniform": 5, "gather": 2}[mode] * D
    comp = (2 * nh + 2 * kh + 6 * f + d_in + r + (n * T if scores else 0)
            + ((nh + kh) if d.qk_norm and full else 0))
    fp32 = 2 * D + 4 + ((n * T + 2 * n) if scores else n) + ((nh + kh + 2 * n + 2 * k) if d.qk_norm else 0)
    per_layer = t * (comp * b + fp32 * FP32) + (2 * D + (2 * d.H if d.qk_norm else 0)) * b  # + norm scales
    if mode == "uniform":
        per_layer += d.adapter_w * b
    elif mode == "gather":
        per_layer += rows * d.adapter_w * b
    elif cast_weights:
        per_layer += d.layer_w * b
    outside = t * ((5 * n * T if scores else 0) + 4 * D + hidden + 4 * d.H * b + 16)
    return per_layer, outside


def _activations(d: Dims, L: int, t: int, rows: int, T: int, b: int, attention: str, mode: str,
                 rank: int | None, cast_weights: bool) -> tuple[int, int, dict[str, int]]:
    """Estimated activation bytes per device -> (no remat, remat, parts): L layers of `residual_bytes`; with remat
    also one layer's full residuals, recomputed during the backward pass; both plus one LOGIT_CHUNK of fp32 logits
    and their gradient (min(2048, t) x v x 4 x 2; assumes a chunk's rows stay spread over the batch shards).
    Checked against XLA's CPU memory analysis of a real fp32 step: within ~10% without remat, ~30% over with
    remat (XLA frees the recomputed layer's values as it goes); not yet measured on an accelerator."""
    from tinker_jax.training.step import LOGIT_CHUNK

    kw = dict(mode=mode, rank=rank, attention=attention, cast_weights=cast_weights)
    layer_no, out_no = residual_bytes(d, t, rows, T, b, remat=False, **kw)
    layer_re, out_re = residual_bytes(d, t, rows, T, b, remat=True, **kw)
    logits = min(LOGIT_CHUNK, t) * d.v * FP32 * 2
    no_remat = L * layer_no + out_no + logits
    remat = L * layer_re + layer_no + out_re + logits
    scores = t * d.n * T * (b + FP32) if attention != "cudnn" else 0
    return int(no_remat), int(remat), {"per_layer": int(layer_no), "scores_per_layer": int(scores),
                                       "per_layer_remat": int(layer_re), "logits": int(logits)}


def sampler_transients(d: Dims, L: int, sb: int, layer_bytes: int, *, rows: int, prefill_rows: int,
                       prefill_len: int, chunk: int | None, seq_len: int, paged_decode: bool,
                       chunk_rows: tuple[int, ...] = (1,), chunk_budget: int | None = None) -> dict[str, int]:
    """Estimated bytes per device of the sampler's largest transients, by call: what the call's temporaries and
    the outputs it hands back take beyond its inputs (XLA:CPU's memory analysis of the real kernels stays under
    these, tests/test_plan.py). Elements in the sampler's dtype (sb bytes) unless fp32; n = nh / H; one layer's
    weights (`layer_bytes`, the layer loop's slice of the stacked weights) in every call.

      prefill  whole prompts, r = prefill_rows rows (this device's share) of T = prefill_len positions, t = rT:
               their dense cache k, v [L, t, kh] (copied into pool pages after); a layer's values, t (4D + 2nh +
               2kh + 3f); its attention scores [r, n, T, T] fp32 x5 (scores, mask fill, exponentials,
               probabilities, as XLA:CPU keeps them at T = 1,024: the einsum path a prefill takes); the
               prompt-logprob logits of one chunk
               [r, C, v] fp32 x2 (C = kernels._chunk(T), 256 at most)
      chunk    long prompts' chunks (`chunk` positions each) over their pages, a row each, in a call of up to
               the largest of `chunk_rows` (the prefill row buckets' share of this device) rows, S = the most slots
               a page table spans ((ceil((seq_len - 2) / chunk) + 1) x chunk: a prompt that starts after cached
               pages not on a chunk boundary takes one chunk more of slots): per row its values and logits [C, v]
               fp32 x2; per slot attended (rows x slots: at most chunk_budget, the prefill token budget's share
               of this device, past the smallest bucket; Sampler._chunk_calls) a layer's context gathered from
               the pages, k and v [kh], and scores [n, chunk] fp32 x4
      decode   r = rows on this device, each attending over S = seq_len slots: a layer's context gathered from
               the pages, k and v [r, S, kh] (none with the paged kernel, which reads them in place); the logits
               [r, v] fp32 x2
    """
    from tinker_jax.sampling.kernels import _chunk

    D, nh, kh, f, v, n = d.D, d.nh, d.kh, d.f, d.v, d.n
    values = lambda t: t * sb * (4 * D + 2 * nh + 2 * kh + 3 * f)  # noqa: E731 - one layer's [t, ...] values
    r, T = prefill_rows, prefill_len
    prefill = (2 * L * r * T * kh * sb + values(r * T) + 5 * r * n * T * T * FP32
               + 2 * r * _chunk(T) * v * FP32 + layer_bytes)
    out = {"prefill": int(prefill) if r else 0}
    if chunk:
        S = (-(-max(seq_len - 2, 1) // chunk) + 1) * chunk
        budget = chunk_budget if chunk_budget is not None else min(chunk_rows) * S
        fit = [b for b in chunk_rows if b == min(chunk_rows) or b * chunk <= budget]  # rows a call can have
        slots = max(b * (S if b == min(chunk_rows) else min(S, budget // b)) for b in fit)
        out["chunk"] = int(max(fit) * (values(chunk) + 2 * _chunk(chunk) * v * FP32)
                           + slots * (2 * kh * sb + 4 * n * chunk * FP32) + layer_bytes)
    out["decode"] = int((0 if paged_decode else 2 * rows * seq_len * kh * sb) + 2 * rows * v * FP32
                        + values(rows) + layer_bytes) if rows else 0
    return out


def _largest_layer(table: list, size) -> int:
    """The largest of one layer's summed size(name, local shape) over its parameters, across the decoder's layer
    stacks (models.config.STACKS: a MoE model's dense layers are a second stack)."""
    return max(sum(size(name, local) for name, _, _, local in table if name.startswith(stack + "."))
               for stack in STACKS)


def _workspace(cfg: ModelConfig, mesh: PlanMesh, tensor_only: list, itemsize: int, full: bool) -> int:
    """Estimated transient bytes of FSDP (0 when fsdp = 1): each layer's weights are all-gathered over fsdp for its
    matmuls (XLA inserts the gather inside the layer scan), and the unembedding matrix for the logits; a full
    fine-tuning step also holds that layer's weight gradient before its reduce-scatter. Layers and unembedding run
    at different times: the larger of the two. `tensor_only`: the parameter table placed on a mesh without
    data/fsdp (what one gather yields)."""
    if mesh.fsdp == 1:
        return 0
    layer = _largest_layer(tensor_only, lambda name, local: _nbytes(local[1:], itemsize))
    unembed = sum(_nbytes(local, itemsize) for name, _, _, local in tensor_only
                  if name == ("embed" if cfg.tie_embeddings else "lm_head.kernel"))
    return max(layer, unembed) * (2 if full else 1)


# ---------------------------------------------------------------------------------------------------- plan


def plan(cfg: ModelConfig, mesh: PlanMesh = PlanMesh(), *, lora_rank: int | None = 32, full: bool = False,
         adapters: int = 1, batch_tokens: int = 8192, seq_len: int | None = None, remat: bool = False,
         dtype: str = "float32", attention: str = "einsum", device_memory: int | str | None = None,
         sampler_batch: int = 16, sampler_seq_len: int = 1024, sampler_adapters: int = 16,
         sampler_kv_tokens: int | None = None, sampler_page_size: int = 16, sampler_dtype: str | None = None,
         sampler_quantize: str | None = None, sampler_prefill_chunk: int | None = 512,
         sampler_decode_attention: str = "auto") -> Plan:
    """Per-device memory of training (LoRA rank `lora_rank`, or `full`) and sampling one base model on `mesh`.

    Defaults are the engine's (config.EngineConfig / SamplerConfig / LoraConfig): dtype float32, one micro-batch of
    `batch_tokens` (max_tokens_per_batch) in rows of `seq_len` tokens (default: one row per batch shard), a
    sampler of 16 rows x 1024 tokens with 16 resident adapters and a KV cache of rows x tokens (`sampler_kv_tokens`
    in pages of `sampler_page_size`), all in `sampler_dtype` (default `dtype`; another keeps a copy of the base
    weights in it; `sampler_quantize` "int8" keeps a copy with int8 block projections, models.quant), prompts
    longer than `sampler_prefill_chunk` prefilled in chunks (0 or None: whole), decode attention
    `sampler_decode_attention` (paged: the Pallas kernel, no gathered context). Errors name the CLI flag of the bad
    argument.
    """
    from jax.sharding import NamedSharding

    from tinker_jax.config import EngineConfig, LoraConfig
    from tinker_jax.sampling.pages import pages_per_shard
    from tinker_jax.models import lora as lora_math
    from tinker_jax.models.decoder import DECODE_ATTENTION
    from tinker_jax.models.quant import MODES as QUANTIZE_MODES
    from tinker_jax.models.sharding import spec_for

    if dtype not in DTYPES:
        raise PlanError(f"--param-dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if sampler_dtype is not None and sampler_dtype not in DTYPES:
        raise PlanError(f"--sampler-dtype: expected one of {', '.join(DTYPES)}, got {sampler_dtype!r}")
    if sampler_quantize not in (None, *QUANTIZE_MODES):
        raise PlanError(f"--sampler-quantize: expected one of {', '.join(QUANTIZE_MODES)}, got {sampler_quantize!r}")
    if sampler_decode_attention not in ("auto", *DECODE_ATTENTION):
        raise PlanError(f"--sampler-decode-attention: expected auto or one of {', '.join(DECODE_ATTENTION)}, got "
                        f"{sampler_decode_attention!r}")
    if attention not in ATTENTIONS:
        raise PlanError(f"--attention: expected one of {', '.join(ATTENTIONS)}, got {attention!r}")
    if not full and (lora_rank is None or isinstance(lora_rank, bool) or int(lora_rank) < 1):
        raise PlanError(f"--lora-rank: must be a positive integer, got {lora_rank!r}")
    for flag, value, lo in (("--batch-tokens", batch_tokens, 1), ("--adapters", adapters, 1),
                            ("--sampler-batch", sampler_batch, 0), ("--sampler-seq-len", sampler_seq_len, 1),
                            ("--sampler-adapters", sampler_adapters, 1), ("--seq-len", seq_len, 1),
                            ("--sampler-kv-tokens", sampler_kv_tokens, 1),
                            ("--sampler-page-size", sampler_page_size, 1),
                            ("--sampler-prefill-chunk", sampler_prefill_chunk, 0)):
        if value is not None and int(value) < lo:
            raise PlanError(f"{flag}: must be >= {lo}, got {value}")
    device_memory = parse_bytes(device_memory)
    lcfg, ecfg = LoraConfig(), EngineConfig()
    if not full and adapters > lcfg.max_slots - 1:
        raise PlanError(f"--adapters: at most {lcfg.max_slots - 1} LoRA runs per rank and base model "
                        f"(lora.max_slots {lcfg.max_slots}; slot 0 is the null adapter)")

    b = DTYPES[dtype]
    sdt = sampler_dtype or dtype
    sb = DTYPES[sdt]  # the sampler's itemsize
    rank = None if full else int(lora_rank)
    amesh = mesh.abstract()
    one = mesh.abstract(data=1, fsdp=1, tensor=1, expert=1)
    notes: list[str] = []

    # ---- exact: base weights, trainable weights, gradient accumulators, Adam moments
    state = _abstract_params(cfg, dtype)
    table = _param_table(state, amesh)
    n_params = sum(math.prod(shape) for _, _, shape, _ in table)
    params_local = sum(math.prod(local) for _, _, _, local in table)
    if full:
        slots = 0
        trainable_params = n_params
        trainable = params_local * FP32  # FullState: a private fp32 copy of every weight, placed like the base
        step_grad = trainable  # the step's fresh gradient tree, before it is added into the accumulator
        trainable_note = "full fine-tuning: the run's private fp32 copy of every weight (FullState)"
        grad_note = "fp32 accumulator + the step's fresh gradient, before it is added in"
        # sampling a full run's weights: save_weights_for_sampler snapshots a copy of them
        # the run's fp32 weights, or cast to the sampler's dtype where it differs from the engine's (BaseWorker)
        snap_b, snap_dt = (sb, sdt) if sdt != dtype or sampler_quantize else (FP32, "fp32")
        sampler_w, sampler_w_whole = _sampler_copy(table, snap_b, sampler_quantize)
        sampler_note = f"one sampled snapshot of the run: a copy of its weights in {snap_dt}, placed like them"
        if sampler_quantize:
            sampler_note += f" (block projections {sampler_quantize}, sampler.quantize)"
    else:
        slots = pool_capacity(adapters, lcfg.initial_slots, lcfg.max_slots)
        trainable_params = sum(math.prod(s) for w in lora_math.shapes(cfg, rank).values() for s in w.values())
        per_slot = _adapter_bytes(cfg, rank, None, amesh, FP32)
        trainable = _adapter_bytes(cfg, rank, slots, amesh, FP32)
        step_grad = 2 * adapters * per_slot  # the step's compact copy of the slots it uses, and their gradient
        runs = f"{adapters} run{'s' * (adapters != 1)}"
        trainable_note = (f"LoRA rank {rank} pool: {slots} slots x {fmt_bytes(per_slot)} (fp32, every projection; "
                          f"slot 0 is the null adapter; {runs})")
        grad_note = f"fp32 accumulator ({slots} slots) + the step's copy of the adapters of {runs} and their gradient"
        sampler_w = _adapter_bytes(cfg, rank, sampler_adapters + 1, amesh, sb)
        sampler_w_whole = _adapter_bytes(cfg, rank, sampler_adapters + 1, one, sb)
        sampler_note = (f"sampler adapter table, rank {rank}: {sampler_adapters}+1 slots in {sdt}, placed like the "
                        "pools (built when an adapter of this rank is first sampled)")
        if sdt != dtype or sampler_quantize:
            local, whole = _sampler_copy(table, sb, sampler_quantize)
            sampler_w += local
            sampler_w_whole += whole
            what = f"{sdt}, block projections {sampler_quantize} (sampler.quantize)" if sampler_quantize else \
                f"{sdt} (sampler.dtype)"
            sampler_note += f"; and the sampler's copy of the base weights in {what}"

    # ---- estimates: activations and the FSDP workspace of one micro-batch
    seq = seq_len or default_seq_len(batch_tokens, mesh.batch_shards,
                                     min(ecfg.max_seq_len, cfg.max_position_embeddings))
    T, rows = micro_batch(batch_tokens, seq, mesh.batch_shards)
    if rows % mesh.batch_shards:
        notes.append(f"batching pads rows to powers of two (here {rows}), which data x expert x fsdp = "
                     f"{mesh.batch_shards} does not divide: the engine cannot split such a micro-batch evenly; "
                     "prefer a power of two")
    rows_dev = -(-rows // mesh.batch_shards)
    t = rows_dev * T
    if rows * T > batch_tokens:
        notes.append(f"a micro-batch is {rows} rows x {T} tokens = {rows * T} tokens, more than --batch-tokens "
                     f"{batch_tokens}: the batching gives every batch shard (data x expert x fsdp = "
                     f"{mesh.batch_shards}) at least one row")
    # a full run steps alone; LoRA rows of one run take "uniform" mode, rows of several runs "gather"
    mode = "full" if full else ("uniform" if adapters == 1 else "gather")
    layer_w = _largest_layer(table, lambda name, local: math.prod(local[1:]) if name.endswith(".kernel") else 0)
    act_no, act_re, parts = _activations(dims(cfg, amesh, rank, layer_w), cfg.n_layers, t, rows_dev, T, b,
                                         attention, mode, rank, cast_weights=full and dtype != "float32")
    tensor_only = _param_table(state, mesh.abstract(data=1, fsdp=1, expert=1))  # what one fsdp gather yields
    workspace = _workspace(cfg, mesh, tensor_only, FP32 if full else b, full)

    # ---- sampler, placed as sampling.kernels.Placement places it over the engine's mesh: the KV pool's pages over
    # the batch shards (max_batch rounded up to a multiple of them), kv heads over tensor where K divides, the
    # adapter table like the training pools
    B = -(-sampler_batch // mesh.batch_shards) * mesh.batch_shards
    kv_tokens = sampler_kv_tokens if sampler_kv_tokens is not None else B * sampler_seq_len  # SamplerConfig's default
    n = mesh.batch_shards
    kv_shape = (cfg.n_layers, n, pages_per_shard(kv_tokens, sampler_page_size, n) if B else 0, sampler_page_size,
                cfg.n_kv_heads, cfg.head_dim)
    kv_spec = spec_for(("batch", None, None, "kv_heads", "head_dim"), kv_shape, amesh)
    kv = 2 * _nbytes(NamedSharding(amesh, kv_spec).shard_shape(kv_shape), sb)
    if B != sampler_batch:
        notes.append(f"sampler rows: {sampler_batch} rounded up to {B}, a multiple of the batch shards "
                     "(data x expert x fsdp)")
    if sampler_batch == 0:
        sampler_w = sampler_w_whole = 0
        sampler_note = "no sampler (--sampler-batch 0)"
    elif mesh.devices > 1:
        notes.append(f"sampler: placed over the engine's mesh (sampling.kernels.Placement); a sampler on one device "
                     f"would hold its whole cache ({fmt_bytes(2 * _nbytes(kv_shape, sb))}) and "
                     f"{'snapshot' if full else 'adapter table'} ({fmt_bytes(sampler_w_whole)}) there")

    # ---- the sampler's largest call: a prefill of whole prompts (the longest length bucket prefilled whole, in
    # the most rows the prefill row buckets and token budget allow), a long prompt's chunk, or a decode step
    from tinker_jax.sampling.scheduler import PREFILL_BATCHES, PREFILL_TOKEN_BUDGET, default_lengths, row_buckets

    S, chunk = sampler_seq_len, sampler_prefill_chunk or None
    whole = max([x for x in default_lengths(S) if chunk is None or x <= chunk] or [min(default_lengths(S))])
    buckets = row_buckets(PREFILL_BATCHES, n, B)
    fit = [x for x in buckets if x * whole <= PREFILL_TOKEN_BUDGET]
    prefill_rows = max(fit) if fit else n
    chunk_rows = max([x for x in buckets if chunk and x * chunk <= PREFILL_TOKEN_BUDGET] or buckets[:1])
    trans = sampler_transients(
        dims(cfg, amesh, rank, layer_w), cfg.n_layers, sb,
        _largest_layer(tensor_only, lambda name, local: _nbytes(local[1:], sb)), rows=B // n,
        prefill_rows=prefill_rows // n, prefill_len=whole, chunk=chunk if chunk and S > chunk else None,
        seq_len=S, paged_decode=sampler_decode_attention == "paged", chunk_rows=tuple(x // n for x in buckets),
        chunk_budget=PREFILL_TOKEN_BUDGET // n) if B else {}
    calls = {"prefill": f"a prefill of {prefill_rows} rows x {whole} tokens", "chunk": f"{chunk}-token chunks of up "
             f"to {chunk_rows} prompts of up to {S} tokens", "decode": f"a decode step of {B} rows over {S} slots"}
    sampler_tmp = max(trans.values(), default=0)
    sampler_tmp_note = (
        "the largest of the sampler's calls: " + ", ".join(f"{calls[k]} {fmt_bytes(v)}"
                                                                     for k, v in trans.items())
        + " (a prefill's dense cache, one layer's values, attention scores and weights, the logits of a chunk of "
        "prompt logprobs; a decode step's gathered context and logits; formulas in plan.sampler_transients)"
        if trans else "no sampler (--sampler-batch 0)")

    scores = f", attention probabilities {fmt_bytes(parts['scores_per_layer'])}" if parts["scores_per_layer"] else ""
    lines = (
        Line("parameters", params_local * b,
             f"base model, {dtype}: {params_local:,} of {n_params:,} parameters per device", True),
        Line("trainable", trainable, trainable_note, True),
        Line("gradients", trainable + step_grad, grad_note, True),
        Line("optimizer", 2 * trainable, "Adam mu and nu, fp32, placed like the trainable weights", True),
        Line("activations", act_re if remat else act_no,
             f"{'with' if remat else 'without'} remat; {mode} step, {t} tokens in rows of {T}, {attention} attention; "
             f"without remat {fmt_bytes(act_no)} ({fmt_bytes(parts['per_layer'])} a layer{scores}), with remat "
             f"{fmt_bytes(act_re)} ({fmt_bytes(parts['per_layer_remat'])} a layer + one layer recomputed); logits "
             f"chunk {fmt_bytes(parts['logits'])}", False),
        Line("workspace", workspace, "fsdp all-gather of one layer (or the unembedding): "
             + ("fp32 weights and their gradient" if full else f"{dtype} base weights") if mesh.fsdp > 1 else
             "none: fsdp = 1 (each device holds its weights whole, up to tensor)", False),
        Line("kv_cache", kv, f"sampler ({B} rows), k and v pages [{cfg.n_layers} layers, {n} shards, {kv_shape[2]} "
             f"pages (1 scratch) of {sampler_page_size} tokens, {cfg.n_kv_heads} kv heads, {cfg.head_dim}] for "
             f"{kv_tokens:,} tokens in {sdt}, placed {_spec_text(kv_spec)}", True),
        Line("sampler_weights", sampler_w, sampler_note, True),
        Line("sampler_workspace", sampler_tmp, sampler_tmp_note, False),
    )
    total = sum(x.bytes for x in lines)

    if mesh.expert > 1:
        what = ("its MoE layers' experts (and the rows of every batch); adapters and every other weight are replicated "
                "over it" if cfg.is_moe else f"only the rows of every batch ({cfg.architecture} has no MoE layers, so "
                "every weight is replicated over it, as over data)")
        notes.append(f"expert={mesh.expert}: the expert axis splits {what}")
    if cfg.is_moe:
        notes.append("MoE: activations and workspace are the dense formula's; a MoE layer's k copies of each token, "
                     "its experts' adapters in the forward and the grouped matmul's gathered expert matrices are not "
                     "counted")
    if mesh.data > 1:
        notes.append(f"data={mesh.data}: weights and optimizer state are replicated over data (only fsdp and tensor "
                     "split them); data splits the rows")
    if rank and rank > min(lcfg.max_rank, cfg.d_model):
        notes.append(f"the engine refuses rank {rank} by default (lora.max_rank {lcfg.max_rank}, model width "
                     f"{cfg.d_model})")
    if not remat and device_memory and total - act_no + act_re <= device_memory < total:
        notes.append(f"with --remat it would fit: activations {fmt_bytes(act_re)} instead of {fmt_bytes(act_no)}, "
                     f"total {fmt_bytes(total - act_no + act_re)}")
    notes.append("activations, workspace and sampler_workspace are estimates (formulas in tinker_jax/plan.py), "
                 "counted as if the sampler's largest call ran during a training step; XLA's other temporaries "
                 "and fragmentation are not counted; on a GPU, JAX takes 75% of its memory unless "
                 "XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise")
    return Plan(model=f"{cfg.architecture} ({cfg.family})", n_params=n_params, trainable_params=trainable_params,
                mesh=mesh, mode="full" if full else "lora", lora_rank=rank, adapters=0 if full else adapters,
                pool_slots=slots, dtype=dtype, remat=remat, attention=attention, batch_tokens=batch_tokens,
                seq_len=T, rows=rows, tokens_per_device=t, lines=lines, activations_no_remat=act_no,
                activations_remat=act_re, total=total, device_memory=device_memory, notes=tuple(notes),
                replicated=tuple(_replicated_dims(table, mesh)), params_per_device=params_local)


def _spec_text(spec) -> str:
    """PartitionSpec -> "[L, n/fsdp, P, page, K/tensor, H]"-like text for the KV pool's six dims."""
    names = ("L", "n", "P", "page", "K", "H")
    parts = []
    for name, ax in zip(names, tuple(spec) + (None,) * (len(names) - len(spec))):
        ax = (ax,) if isinstance(ax, str) else tuple(ax or ())
        parts.append(name + "".join(f"/{a}" for a in ax))
    return "[" + ", ".join(parts) + "]"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


__all__ = ["Plan", "PlanMesh", "PlanError", "Line", "plan", "parse_mesh", "parse_bytes", "read_config",
           "pool_capacity", "micro_batch", "default_seq_len", "fmt_bytes"]
