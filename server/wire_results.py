"""Result encoding (wire doc §3.5, §4.6, §4.9): engine results -> the bytes retrieve_future serves.

ForwardBackwardOutput and SampleResponse are stored as protobuf (mandatory for SDK >= 0.25) and re-encoded as JSON
only for an old client that does not accept proto; every other result is JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import numpy as np
import pydantic
from tinker import types
from tinker.proto import response_conv
from tinker.proto import tinker_public_pb2 as pb
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs

from server.wire_tensors import as_array, dense_array, int32_bytes, proto_tensor
from tinker_jax.engine.records import iso_time  # noqa: F401  (re-exported by server.wire)

PROTO_CONTENT_TYPE = "application/x-protobuf"
JSON_CONTENT_TYPE = "application/json"

# Future kinds whose result goes out as protobuf when the client accepts it (§3.5); every other kind is JSON.
PROTO_RESULT_KINDS = frozenset({"forward_backward", "forward", "sample"})

# --- ForwardBackwardOutput ---------------------------------------------------------------------------------------


def _check_metrics(metrics: dict[str, float]) -> dict[str, float]:
    for key in metrics:
        # The client splits every key on ":" into (name, reduction) and crashes otherwise (§4.7).
        if not isinstance(key, str) or key.count(":") != 1:
            raise ValueError(f"metrics: key {key!r} must look like 'name:reduction' with exactly one colon")
    return {k: float(v) for k, v in metrics.items()}


def encode_forward_backward_output(out: types.ForwardBackwardOutput) -> bytes:
    """proto ForwardBackwardOutput (§4.6): one ArrayRecord per run of datums with the same fields, dtypes and
    trailing shapes; per-datum arrays concatenated with int64 *byte* offsets. Field names must be the same in every
    record (the client indexes every field for every datum), so a missing field is an empty slice."""
    metrics = _check_metrics(out.metrics)
    rows = []  # per datum: {name: (array, proto dtype)}
    for i, datum in enumerate(out.loss_fn_outputs):
        rows.append({name: as_array(v, f"loss_fn_outputs[{i}].{name}") for name, v in datum.items()})
    names: dict[str, tuple[int, tuple[int, ...]]] = {}  # field -> (dtype, trailing) where first seen
    for row in rows:
        for name, (arr, dtype) in row.items():
            names.setdefault(name, (dtype, arr.shape[1:]))

    def signature(row: dict) -> tuple:
        return tuple((row[n][1], row[n][0].shape[1:]) if n in row else None for n in names)

    msg = pb.ForwardBackwardOutput(loss_fn_output_type=out.loss_fn_output_type)
    msg.metrics.update(metrics)
    start = 0
    while start < len(rows):
        end = start + 1
        while end < len(rows) and signature(rows[end]) == signature(rows[start]):
            end += 1
        record = msg.loss_fn_outputs.add(type_tag=out.loss_fn_output_type, num_datums=end - start)
        for name, (dtype, trailing) in names.items():
            arrays = [r[name][0] for r in rows[start:end] if name in r]
            if arrays:
                dtype, trailing = rows[start][name][1], arrays[0].shape[1:]
            sizes = [r[name][0].nbytes if name in r else 0 for r in rows[start:end]]
            bt = record.fields[name]
            bt.dtype = dtype
            bt.trailing_shape.extend(trailing)
            bt.data = b"".join(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes() for a in arrays)
            bt.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype("<i8").tobytes()
        start = end
    return msg.SerializeToString()


def _tensor_json(value: Any, where: str) -> dict[str, Any]:
    arr, dtype = as_array(value, where)
    return {"data": arr.reshape(-1).tolist(), "dtype": "float32" if dtype == pb.DTYPE_FLOAT32 else "int64",
            "shape": list(arr.shape)}


def forward_backward_output_to_json(out: types.ForwardBackwardOutput) -> dict[str, Any]:
    """JSON form for SDKs that do not accept proto (<= 0.18.0)."""
    return {
        "loss_fn_output_type": out.loss_fn_output_type,
        "loss_fn_outputs": [{k: _tensor_json(v, f"loss_fn_outputs[{i}].{k}") for k, v in d.items()}
                            for i, d in enumerate(out.loss_fn_outputs)],
        "metrics": _check_metrics(out.metrics),
    }


# --- SampleResponse -------------------------------------------------------------------------------------

_STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


def _topk_proto(topk: TopkLogprobs | None, lists: Any, where: str) -> pb.TopkLogprobs | None:
    """Either form the SDK type allows -> TopkLogprobs [length, k]; empty cells get the sentinel
    (token 0, logprob -99999) the client trims (and a row starting with it becomes None)."""
    if topk is not None:
        ids, lps = np.asarray(topk.token_ids), np.asarray(topk.logprobs)
        if ids.ndim != 2 or ids.shape != lps.shape:
            raise ValueError(f"{where}: token_ids and logprobs must be matching [length, k] matrices")
    elif lists is not None:
        k = max((len(row) for row in lists if row), default=0)
        ids = np.zeros((len(lists), k), dtype=np.int64)
        lps = np.full((len(lists), k), MASK_LOGPROB, dtype=np.float32)
        for i, row in enumerate(lists):
            for j, (tok, lp) in enumerate(row or ()):
                ids[i, j], lps[i, j] = tok, lp
    else:
        return None
    return pb.TopkLogprobs(token_ids=int32_bytes(ids, f"{where}.token_ids"),
                           logprobs=np.asarray(lps, dtype="<f4").tobytes(), k=ids.shape[1], length=ids.shape[0])


def encode_sample_response(resp: types.SampleResponse) -> bytes:
    """proto SampleResponse (§4.9). Accepts the numpy fields or the list-backed private fields of the SDK type.
    Undefined prompt logprobs (None) travel as NaN, which the client turns back into None."""
    msg = pb.SampleResponse(prompt_cache_hit_tokens=int(resp.prompt_cache_hit_tokens or 0))
    for i, seq in enumerate(resp.sequences):
        where = f"sequences[{i}]"
        if seq.stop_reason not in _STOP_REASONS:
            raise ValueError(f"{where}.stop_reason: must be 'stop' or 'length', got {seq.stop_reason!r}")
        tokens = seq.tokens_np if seq.tokens_np is not None else seq._tokens_list or []
        out = msg.sequences.add(stop_reason=_STOP_REASONS[seq.stop_reason],
                                tokens=int32_bytes(tokens, f"{where}.tokens"))
        logprobs = seq.logprobs_np if seq.logprobs_np is not None else seq._logprobs_list
        if logprobs is not None:
            lp = np.asarray(logprobs, dtype="<f4").reshape(-1)
            if lp.size != len(tokens):
                raise ValueError(f"{where}.logprobs: {lp.size} logprobs for {len(tokens)} tokens")
            out.logprobs = lp.tobytes()
        topk = _topk_proto(seq.topk_logprobs_np, seq._topk_logprobs_list, f"{where}.topk_logprobs")
        if topk is not None:
            out.topk_sampled_logprobs.CopyFrom(topk)
    prompt_lp = resp.prompt_logprobs_np if resp.prompt_logprobs_np is not None else resp._prompt_logprobs_list
    if prompt_lp is not None:
        if not isinstance(prompt_lp, np.ndarray):
            prompt_lp = [np.nan if x is None else x for x in prompt_lp]
        msg.prompt_logprobs = np.asarray(prompt_lp, dtype="<f4").reshape(-1).tobytes()
    topk = _topk_proto(resp.topk_prompt_logprobs_np, resp._topk_prompt_logprobs_list, "topk_prompt_logprobs")
    if topk is not None:
        msg.topk_prompt_logprobs.CopyFrom(topk)
    if resp.target_prompt_logprobs is not None:
        msg.target_prompt_logprobs.CopyFrom(
            proto_tensor(resp.target_prompt_logprobs, "target_prompt_logprobs", "float32"))
    if resp.prompt_alt_tokens is not None:
        alt = resp.prompt_alt_tokens
        tokens = pb.Tensor(dtype=pb.DTYPE_INT32)  # §4.8: int32 ids; the client widens them to int64
        arr = dense_array(alt.tokens)
        tokens.shape.extend(arr.shape)
        tokens.dense = int32_bytes(arr, "prompt_alt_tokens.tokens")
        msg.prompt_alt_tokens.tokens.CopyFrom(tokens)
        msg.prompt_alt_tokens.logprobs.CopyFrom(proto_tensor(alt.logprobs, "prompt_alt_tokens.logprobs", "float32"))
    return msg.SerializeToString()


def sample_response_to_json(resp: types.SampleResponse) -> dict[str, Any]:
    """JSON form for SDKs <= 0.18.0 (§4.9): NaN prompt logprobs become null."""
    out: dict[str, Any] = {
        "type": "sample",
        "sequences": [{"stop_reason": s.stop_reason, "tokens": list(s.tokens), "logprobs": s.logprobs}
                      for s in resp.sequences],
        "prompt_cache_hit_tokens": int(resp.prompt_cache_hit_tokens or 0),
    }
    if resp.prompt_logprobs is not None:
        out["prompt_logprobs"] = [None if x is None or math.isnan(x) else x for x in resp.prompt_logprobs]
    if resp.topk_prompt_logprobs is not None:
        out["topk_prompt_logprobs"] = [None if row is None else [list(p) for p in row]
                                       for row in resp.topk_prompt_logprobs]
    return out


# --- dispatch -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedResult:
    content_type: str
    body: bytes


def encode_result(kind: str, result: Any) -> EncodedResult:
    """An engine result in its canonical stored form: proto for PROTO_RESULT_KINDS, JSON for the rest."""
    if kind in ("forward_backward", "forward"):
        if not isinstance(result, types.ForwardBackwardOutput):
            raise TypeError(f"{kind} result must be a tinker.types.ForwardBackwardOutput, got {type(result).__name__}")
        return EncodedResult(PROTO_CONTENT_TYPE, encode_forward_backward_output(result))
    if kind == "sample":
        if not isinstance(result, types.SampleResponse):
            raise TypeError(f"sample result must be a tinker.types.SampleResponse, got {type(result).__name__}")
        return EncodedResult(PROTO_CONTENT_TYPE, encode_sample_response(result))
    return EncodedResult(JSON_CONTENT_TYPE, json_bytes(_json_result(result)))


def _json_result(result: Any) -> dict[str, Any]:
    if result is None:
        obj: Any = {}
    elif isinstance(result, pydantic.BaseModel):
        obj = result.model_dump(mode="json", exclude_none=True)  # e.g. ephemeral sampler save: no "path" at all
    elif is_dataclass(result) and not isinstance(result, type):
        obj = {k: v for k, v in asdict(result).items() if v is not None}
    else:
        obj = result
    if not isinstance(obj, dict):
        raise TypeError(f"a JSON future result must be an object, got {type(obj).__name__}")
    # The client checks for these before parsing a success (§3.2): a result must never look like them.
    if "error" in obj or obj.get("type") == "try_again":
        raise ValueError("a successful result must not carry an 'error' key or type 'try_again'")
    return obj


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def downgrade_to_json(kind: str, proto_body: bytes) -> bytes:
    """A stored proto result re-encoded as JSON for a client that did not send Accept: application/x-protobuf.
    Decoded with the SDK's own reader so both forms always agree."""
    if kind == "sample":
        return json_bytes(sample_response_to_json(response_conv.deserialize_sample_response(proto_body)))
    return json_bytes(forward_backward_output_to_json(response_conv.deserialize_forward_backward_output(proto_body)))
