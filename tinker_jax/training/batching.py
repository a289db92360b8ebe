"""Datums -> validated rows (per request, before any device work) -> micro-batches that mix requests.

`validate` checks one forward/forward_backward request (every error names the datum and field at fault) and keeps
its datums as numpy rows. `plan` packs the rows of any number of requests, of any runs of one base model, into
micro-batches: one datum per row (so per-sequence losses such as GSPO see whole sequences), grouped by length,
longest first, each micro-batch with its own length bucket. Inside a micro-batch the rows are ordered by adapter
rank, then slot: each rank's rows form one segment (`Segment`), so every row is multiplied by its own adapter at its
own rank (models.lora). Row counts (per segment) and lengths are rounded up to powers of two, so a stream of random
batch sizes and lengths compiles a handful of programs.

A micro-batch is a plain value (numpy arrays and small dataclasses, `MicroBatch`): the unit a multi-host engine
will broadcast to every process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import tinker.types as tt

from tinker_jax.errors import UserError
from tinker_jax.training.losses import get_loss, input_fill, resolve_config

MIN_LEN = 16  # smallest length bucket
# A micro-batch ends early, before datums of a smaller length bucket, when that saves more than this many padded
# tokens: the price of one more micro-batch (its launches, its result) is worth about this much compute.
SPLIT_SAVING_TOKENS = 2048
# Optional inputs a request may give for some datums only (absent: all ones).
_PARTIAL_OK = ("weights", "sequence_ratio_mask")


def bucket(n: int, lo: int) -> int:
    """Smallest power of two >= max(n, lo)."""
    return max(lo, 1 << max(0, int(n - 1).bit_length()))


def tensor_array(td: tt.TensorData, where: str) -> np.ndarray:
    """A loss_fn_inputs tensor as numpy; UserError naming `where` when it is malformed."""
    try:
        arr = td.to_numpy() if hasattr(td, "to_numpy") else np.asarray(td.data).reshape(td.shape or [-1])
    except Exception as e:  # malformed TensorData (shape/data mismatch)
        raise UserError(f"{where}: malformed tensor ({e})") from None
    return np.asarray(arr)


def datum_tokens(datum: tt.Datum, i: int) -> list[int]:
    toks: list[int] = []
    for c in datum.model_input.chunks:
        if getattr(c, "type", "encoded_text") != "encoded_text":
            raise UserError(f"datum[{i}].model_input: chunk type {c.type!r} is not supported (text only)")
        toks.extend(int(t) for t in c.tokens)
    return toks


# ------------------------------------------------------------------------------------------- validation


@dataclass
class RequestRows:
    """One forward/forward_backward request, validated: per datum its tokens [n], targets [n] (or [n,K]) and
    loss_fn_inputs [n] float32 (absent partial inputs already filled), plus the resolved loss config."""

    loss_fn: str
    config: dict[str, float]
    tokens: list[np.ndarray]
    targets: list[np.ndarray]
    inputs: list[dict[str, np.ndarray]]
    topk: int  # K of [n,K] targets, 0 for [n]

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def validate(datums: Sequence[tt.Datum], loss_fn: str, loss_fn_config=None, *, vocab_size: int,
             max_len: int, max_tokens: int | None = None) -> RequestRows:
    """ValueError naming the datum and field for anything the step could not compute exactly. `max_tokens`: the
    most tokens one request may hold (a server's bound on what one call can make it do)."""
    if not datums:
        raise UserError("data: the batch is empty (no datums)")
    if max_tokens is not None:
        total = sum(len(getattr(c, "tokens", None) or ()) for d in datums for c in d.model_input.chunks)
        if total > max_tokens:
            raise UserError(f"data: {len(datums)} datums of {total} tokens exceed this server's limit of "
                            f"{max_tokens} tokens per request (config max_tokens_per_request); split the batch")
    spec = get_loss(loss_fn)
    config = resolve_config(loss_fn, loss_fn_config)
    allowed = {"target_tokens", *spec.required_inputs, *spec.optional_inputs}
    rows = []
    for i, d in enumerate(datums):
        toks = datum_tokens(d, i)
        n = len(toks)
        if n == 0:
            raise UserError(f"datum[{i}].model_input: empty")
        if n > max_len:
            raise UserError(f"datum[{i}].model_input: length {n} exceeds the model's limit of {max_len} tokens")
        bad = [t for t in toks if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"datum[{i}].model_input: token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        fields = dict(d.loss_fn_inputs)
        missing = [k for k in ("target_tokens", *spec.required_inputs) if k not in fields]
        if missing:
            raise UserError(f"datum[{i}].loss_fn_inputs: missing {missing} required by loss_fn {loss_fn!r}")
        extra = sorted(set(fields) - allowed)
        if extra:
            raise UserError(f"datum[{i}].loss_fn_inputs: unexpected {extra} for loss_fn {loss_fn!r}; "
                             f"allowed: {sorted(allowed)}")
        arrs = {}
        for k, td in fields.items():
            a = tensor_array(td, f"datum[{i}].loss_fn_inputs[{k!r}]")
            if a.shape[:1] != (n,):
                raise UserError(f"datum[{i}].loss_fn_inputs[{k!r}]: first dimension {a.shape[:1] or '()'} "
                                 f"does not match model_input length {n}")
            if k == "target_tokens":
                if a.ndim not in (1, 2) or (a.ndim == 2 and (loss_fn != "cross_entropy" or a.shape[1] == 0)):
                    raise UserError(f"datum[{i}].loss_fn_inputs['target_tokens']: shape {a.shape} not supported")
                if a.dtype.kind == "f" and not np.all(np.isfinite(a) & (a == np.floor(a))):
                    raise UserError(f"datum[{i}].loss_fn_inputs['target_tokens']: must be whole token ids (got "
                                    "NaN, inf or a fraction)")
                if a.dtype.kind not in "iuf":
                    raise UserError(f"datum[{i}].loss_fn_inputs['target_tokens']: must be token ids, got dtype "
                                    f"{a.dtype}")
                if np.any((a < 0) | (a >= vocab_size)):
                    raise UserError(f"datum[{i}].loss_fn_inputs['target_tokens']: ids outside [0, {vocab_size})")
                a = a.astype(np.int32)
            else:
                if k != "weights" and a.shape != (n,):  # weights: the targets' shape, checked below
                    raise UserError(f"datum[{i}].loss_fn_inputs[{k!r}]: shape {a.shape}, expected ({n},): one value "
                                    "per model_input token")
                a = a.astype(np.float32)
                if not np.all(np.isfinite(a)):
                    raise UserError(f"datum[{i}].loss_fn_inputs[{k!r}]: contains NaN or inf")
            arrs[k] = a
        rows.append((np.asarray(toks, np.int32), arrs))
    topk = {r[1]["target_tokens"].shape[1] if r[1]["target_tokens"].ndim == 2 else 0 for r in rows}
    if len(topk) > 1:
        raise UserError("data: target_tokens must all be [N] or all [N,K] with one K")
    topk = topk.pop()
    for i, (_, arrs) in enumerate(rows):
        for k, a in arrs.items():
            if k == "weights" and a.shape != arrs["target_tokens"].shape:
                raise UserError(f"datum[{i}].loss_fn_inputs['weights']: shape {a.shape} != target_tokens "
                                 f"shape {arrs['target_tokens'].shape}")
    input_keys = sorted({k for _, a in rows for k in a} - {"target_tokens"})
    for k in input_keys:
        if k not in _PARTIAL_OK and not all(k in a for _, a in rows):
            raise UserError(f"data: loss_fn_inputs[{k!r}] must be given for every datum or for none")
    inputs = []
    for toks, arrs in rows:
        x = {}
        for k in input_keys:
            if k in arrs:
                x[k] = arrs[k]
            else:
                shape = arrs["target_tokens"].shape if k == "weights" else (len(toks),)
                x[k] = np.full(shape, input_fill(k, config), np.float32)
        inputs.append(x)
    return RequestRows(loss_fn, config, [t for t, _ in rows], [a["target_tokens"] for _, a in rows], inputs, topk)


# ------------------------------------------------------------------------------------------- micro-batches


@dataclass(frozen=True)
class Part:
    """One request's rows as a micro-batch planner sees them: whose adapter (rank, pool slot) they use.
    rank 0: no adapter pool (full fine-tuning, one run per micro-batch)."""

    rows: RequestRows
    rank: int = 0
    slot: int = 0


@dataclass(frozen=True)
class Segment:
    """The rows [start, start + size) of a micro-batch that use rank-`rank` adapters (static), how their product is
    computed (`mode`, models.lora), the pool slots they use (`active` [Sa], padded with the null slot 0) and, per
    row, which entry of `active` it uses (`row_index` [size])."""

    rank: int
    start: int
    size: int
    mode: str
    active: np.ndarray
    row_index: np.ndarray

    @property
    def key(self) -> tuple:
        return (self.rank, self.start, self.size, self.mode, len(self.active))


@dataclass(frozen=True)
class Layout:
    """What a compiled step depends on besides array shapes: the rank segments, the losses, K."""

    segments: tuple[tuple, ...]  # Segment.key per segment
    losses: tuple[str, ...]  # loss_fn of loss_id 0, 1, ...
    topk: int


@dataclass
class MicroBatch:
    tokens: np.ndarray  # [B,T] int32
    positions: np.ndarray  # [B,T] int32
    mask: np.ndarray  # [B,T] float32: 1 real token, 0 padding (also the attention segment id)
    targets: np.ndarray  # [B,T] or [B,T,K] int32
    inputs: dict[str, np.ndarray]  # [B,T] float32 (`weights` like targets); union of every row's keys
    loss_id: np.ndarray  # [B] int32: index into layout.losses
    loss_config: dict[str, np.ndarray]  # [B] float32 per config key (0 for rows of losses without it)
    segments: tuple[Segment, ...]
    layout: Layout
    rows: list[tuple[int, int, int, int]] = field(default_factory=list)  # per real row: (part, datum, row, len)

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape

    def arrays(self) -> dict:
        """The device inputs of the step (everything but host bookkeeping)."""
        return {"tokens": self.tokens, "positions": self.positions, "mask": self.mask, "targets": self.targets,
                "inputs": self.inputs, "loss_id": self.loss_id, "loss_config": self.loss_config,
                "lora": tuple({"active": s.active, "row_index": s.row_index} for s in self.segments)}


def _cost(counts: dict[int, int], T: int, row_multiple: int) -> int:
    """Padded tokens of a micro-batch with `counts` rows per rank."""
    return sum(bucket(n, row_multiple) for n in counts.values()) * T


def plan(parts: Sequence[Part], max_tokens_per_batch: int, row_multiple: int = 1) -> list[MicroBatch]:
    """Every datum of every part into micro-batches within the token budget (one datum per row, each datum once).

    Datums are taken longest first (ties keep submission order); a micro-batch stops when the next datum would
    overflow the budget (with every rank segment rounded up), or before a datum of a smaller length bucket when
    the datums that would follow it would waste more than SPLIT_SAVING_TOKENS of padding. Datums with [N,K]
    targets of different K never share a micro-batch.
    """
    items = [(p, d, len(part.rows.tokens[d]), part.rank, part.rows.topk)
             for p, part in enumerate(parts) for d in range(len(part.rows.tokens))]
    out = []
    for K in sorted({it[4] for it in items}):
        group = sorted((it for it in items if it[4] == K), key=lambda it: -it[2])  # stable
        s = 0
        while s < len(group):
            T = bucket(group[s][2], MIN_LEN)
            counts = {group[s][3]: 1}
            e = s + 1
            while e < len(group):
                rank, t = group[e][3], bucket(group[e][2], MIN_LEN)
                nxt = dict(counts)
                nxt[rank] = nxt.get(rank, 0) + 1
                if _cost(nxt, T, row_multiple) > max(max_tokens_per_batch, _cost(counts, T, row_multiple)):
                    break
                if t < T:
                    room = max(0, max_tokens_per_batch // T - sum(counts.values()))
                    if min(room, len(group) - e) * (T - t) > SPLIT_SAVING_TOKENS:
                        break
                counts = nxt
                e += 1
            out.append(_assemble(parts, [(it[0], it[1]) for it in group[s:e]], T, K, row_multiple))
            s = e
    return out


def _assemble(parts: Sequence[Part], rows: list[tuple[int, int]], T: int, K: int, row_multiple: int) -> MicroBatch:
    """Pad the given (part, datum) rows into one micro-batch: rows ordered by (rank, slot, submission)."""
    rows = sorted(rows, key=lambda r: (parts[r[0]].rank, parts[r[0]].slot, r))
    losses = tuple(sorted({parts[p].rows.loss_fn for p, _ in rows}))  # sorted: one program per set of losses
    input_keys = sorted({k for p, d in rows for k in parts[p].rows.inputs[d]})
    config_keys = sorted({k for p, _ in rows for k in parts[p].rows.config})
    segments, order = [], []
    start = 0
    for rank in sorted({parts[p].rank for p, _ in rows}):
        mine = [r for r in rows if parts[r[0]].rank == rank]
        size = bucket(len(mine), row_multiple)
        slots = [parts[p].slot for p, _ in mine]
        distinct = list(dict.fromkeys(slots))
        active = np.zeros(bucket(len(distinct), 1), np.int32)  # padding: the null slot 0
        active[: len(distinct)] = distinct
        row_index = np.zeros(size, np.int32)  # padding rows: entry 0 (their mask is 0: no loss, no gradient)
        row_index[: len(mine)] = [distinct.index(s) for s in slots]
        if rank:
            mode = "uniform" if len(distinct) == 1 else "gather"
            segments.append(Segment(rank, start, size, mode, active, row_index))
        order += mine + [None] * (size - len(mine))
        start += size
    B = len(order)
    tshape = (B, T, K) if K else (B, T)
    mb = MicroBatch(
        tokens=np.zeros((B, T), np.int32),
        positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        mask=np.zeros((B, T), np.float32),
        targets=np.zeros(tshape, np.int32),
        inputs={k: np.zeros(tshape if k == "weights" else (B, T), np.float32) for k in input_keys},
        loss_id=np.zeros(B, np.int32),
        loss_config={k: np.zeros(B, np.float32) for k in config_keys},
        segments=tuple(segments),
        layout=Layout(tuple(s.key for s in segments), losses, K),
    )
    for r, item in enumerate(order):
        if item is None:
            continue
        p, d = item
        req = parts[p].rows
        n = len(req.tokens[d])
        mb.tokens[r, :n] = req.tokens[d]
        mb.mask[r, :n] = 1.0
        mb.targets[r, :n] = req.targets[d]
        for k in input_keys:
            # An input this request did not give stands for its loss's default (input_fill: weights 1, the
            # config's clip thresholds), never the micro-batch's zeros: a request without weights batched with
            # one that has them would otherwise train on weight 0.
            mb.inputs[k][r, :n] = req.inputs[d][k] if k in req.inputs[d] else input_fill(k, req.config)
        mb.loss_id[r] = losses.index(req.loss_fn)
        for k, v in req.config.items():
            mb.loss_config[k][r] = v
        mb.rows.append((p, d, r, n))
    return mb
