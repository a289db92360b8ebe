"""Datums -> padded numpy batches in a small fixed set of shapes (bucketing), with input validation.

One datum is one row (so per-sequence losses such as GSPO see whole sequences). Datums are grouped by length,
longest first, and each micro-batch gets its own length bucket, so short datums do not pay for the longest one.
Row counts and lengths are rounded up to powers of two, so a stream of random batch sizes and lengths compiles a
handful of programs.
Every check names the datum and field at fault and runs before any device work, so a bad request leaves the
training state untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tinker.types as tt

from tinker_jax.training.losses import get_loss

MIN_LEN = 16  # smallest length bucket
MIN_ROWS = 1
# A micro-batch ends early, before datums of a smaller length bucket, when that saves more than this many padded
# tokens: the price of one more micro-batch (its launches, its result) is worth about this much compute.
SPLIT_SAVING_TOKENS = 2048
# Optional inputs whose absence means "all ones" (cross_entropy weights, gspo sequence_ratio_mask).
_FILL_ONES = ("weights", "sequence_ratio_mask")


def bucket(n: int, lo: int) -> int:
    """Smallest power of two >= max(n, lo)."""
    return max(lo, 1 << max(0, int(n - 1).bit_length()))


@dataclass
class Batch:
    tokens: np.ndarray  # [B,T] int32 model input
    positions: np.ndarray  # [B,T] int32
    mask: np.ndarray  # [B,T] float32: 1 real token, 0 padding (also the attention segment id)
    targets: np.ndarray  # [B,T] or [B,T,K] int32
    inputs: dict[str, np.ndarray]  # loss_fn_inputs other than target_tokens, float32, shaped like targets/mask
    lengths: list[int]  # real length of each datum (rows beyond len(lengths) are padding rows)
    index: list[int]  # position of each row's datum in the request (rows follow length order, not request order)
    topk: int  # K for [N,K] targets, 0 for [N]


def _array(td: tt.TensorData, where: str) -> np.ndarray:
    try:
        arr = td.to_numpy() if hasattr(td, "to_numpy") else np.asarray(td.data).reshape(td.shape or [-1])
    except Exception as e:  # malformed TensorData (shape/data mismatch)
        raise ValueError(f"{where}: malformed tensor ({e})") from None
    return np.asarray(arr)


def datum_tokens(datum: tt.Datum, i: int) -> list[int]:
    toks: list[int] = []
    for c in datum.model_input.chunks:
        if getattr(c, "type", "encoded_text") != "encoded_text":
            raise ValueError(f"datum[{i}].model_input: chunk type {c.type!r} is not supported (text only)")
        toks.extend(int(t) for t in c.tokens)
    return toks


def build_batches(datums: list[tt.Datum], loss_fn: str, *, vocab_size: int, max_len: int,
                  max_tokens_per_batch: int, row_multiple: int = 1) -> list[Batch]:
    """Validate datums and split them into micro-batches, each of bucketed shape within the token budget."""
    if not datums:
        raise ValueError("data: the batch is empty (no datums)")
    spec = get_loss(loss_fn)
    allowed = {"target_tokens", *spec.required_inputs, *spec.optional_inputs}
    rows = []
    for i, d in enumerate(datums):
        toks = datum_tokens(d, i)
        n = len(toks)
        if n == 0:
            raise ValueError(f"datum[{i}].model_input: empty")
        if n > max_len:
            raise ValueError(f"datum[{i}].model_input: length {n} exceeds the model's limit of {max_len} tokens")
        bad = [t for t in toks if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"datum[{i}].model_input: token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        fields = dict(d.loss_fn_inputs)
        missing = [k for k in ("target_tokens", *spec.required_inputs) if k not in fields]
        if missing:
            raise ValueError(f"datum[{i}].loss_fn_inputs: missing {missing} required by loss_fn {loss_fn!r}")
        extra = sorted(set(fields) - allowed)
        if extra:
            raise ValueError(f"datum[{i}].loss_fn_inputs: unexpected {extra} for loss_fn {loss_fn!r}; "
                             f"allowed: {sorted(allowed)}")
        arrs = {}
        for k, td in fields.items():
            a = _array(td, f"datum[{i}].loss_fn_inputs[{k!r}]")
            if a.shape[:1] != (n,):
                raise ValueError(f"datum[{i}].loss_fn_inputs[{k!r}]: first dimension {a.shape[:1] or '()'} "
                                 f"does not match model_input length {n}")
            if k == "target_tokens":
                if a.ndim not in (1, 2) or (a.ndim == 2 and loss_fn != "cross_entropy"):
                    raise ValueError(f"datum[{i}].loss_fn_inputs['target_tokens']: shape {a.shape} not supported")
                if np.any((a < 0) | (a >= vocab_size)):
                    raise ValueError(f"datum[{i}].loss_fn_inputs['target_tokens']: ids outside [0, {vocab_size})")
                a = a.astype(np.int32)
            else:
                a = a.astype(np.float32)
                if not np.all(np.isfinite(a)):
                    raise ValueError(f"datum[{i}].loss_fn_inputs[{k!r}]: contains NaN or inf")
            arrs[k] = a
        rows.append((toks, arrs))
    topk = {r[1]["target_tokens"].shape[1] if r[1]["target_tokens"].ndim == 2 else 0 for r in rows}
    if len(topk) > 1:
        raise ValueError("data: target_tokens must all be [N] or all [N,K] with one K")
    topk = topk.pop()
    for i, (_, arrs) in enumerate(rows):
        for k, a in arrs.items():
            if k == "weights" and a.shape != arrs["target_tokens"].shape:
                raise ValueError(f"datum[{i}].loss_fn_inputs['weights']: shape {a.shape} != target_tokens "
                                 f"shape {arrs['target_tokens'].shape}")
    input_keys = sorted({k for _, a in rows for k in a} - {"target_tokens"})
    for k in input_keys:
        if k not in _FILL_ONES and not all(k in a for _, a in rows):
            raise ValueError(f"data: loss_fn_inputs[{k!r}] must be given for every datum or for none")
    out = []
    for T, idx in length_groups([len(r[0]) for r in rows], max_tokens_per_batch, row_multiple):
        B = bucket(len(idx), max(MIN_ROWS, row_multiple))
        out.append(_pad([rows[i] for i in idx], idx, B, T, topk, input_keys))
    return out


def length_groups(lengths: list[int], max_tokens_per_batch: int, row_multiple: int = 1
                  ) -> list[tuple[int, list[int]]]:
    """-> [(T, datum indices)] per micro-batch. Longest first (a stable sort: ties keep request order); each
    micro-batch takes the next datums, as many as its own length bucket T allows within the token budget, but
    stops before a datum of a smaller bucket t when the datums that would follow it (up to the capacity left)
    would waste more than SPLIT_SAVING_TOKENS of padding at T rather than t."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets = [bucket(lengths[i], MIN_LEN) for i in order]
    groups, s = [], 0
    while s < len(order):
        T = buckets[s]
        per = max(row_multiple, (max_tokens_per_batch // T) // row_multiple * row_multiple)
        e = s + 1
        while e < len(order) and e - s < per:
            if buckets[e] < T and (min(per - (e - s), len(order) - e)) * (T - buckets[e]) > SPLIT_SAVING_TOKENS:
                break
            e += 1
        groups.append((T, order[s:e]))
        s = e
    return groups


def _pad(rows, index, B, T, topk, input_keys) -> Batch:
    tshape = (B, T, topk) if topk else (B, T)
    b = Batch(
        tokens=np.zeros((B, T), np.int32),
        positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        mask=np.zeros((B, T), np.float32),
        targets=np.zeros(tshape, np.int32),
        inputs={k: np.zeros(tshape if k == "weights" else (B, T), np.float32) for k in input_keys},
        lengths=[len(r[0]) for r in rows],
        index=list(index),
        topk=topk,
    )
    for r, (toks, arrs) in enumerate(rows):
        n = len(toks)
        b.tokens[r, :n] = toks
        b.mask[r, :n] = 1.0
        b.targets[r, :n] = arrs["target_tokens"]
        for k in input_keys:
            if k in arrs:
                b.inputs[k][r, :n] = arrs[k]
            elif k in _FILL_ONES:
                b.inputs[k][r, :n] = 1.0
    return b
