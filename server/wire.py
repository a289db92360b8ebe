"""Wire codec, requests side: HTTP bodies -> `tinker.types` objects (wire doc §1.4, §4, §6).

- JSON leniently (§1.4): unknown keys ignored (SDK request models forbid extras, newer SDKs add fields), null treated
  as missing, SDK defaults applied, chunk `type` inferred for SDK <= 0.17.
- protobuf `ForwardBackwardRequest` (SDK >= 0.19, always from 0.25) via the SDK's own `tinker_public_pb2`.
- zstd `Content-Encoding` (only forward_backward uses it; `server.middleware` applies `decompress` to every route).

This module is also the one-stop import for the codec: the result encoders (`server.wire_results`) and tensor
helpers (`server.wire_tensors`) are re-exported here.

Every malformed input raises `tinker_jax.errors.UserError` whose message starts with the path of the field at fault
(`data[3].loss_fn_inputs.weights.shape: ...`), so the HTTP layer can answer 400 with a useful body.
"""

from __future__ import annotations

import json
import types as _pytypes
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pydantic
import zstandard
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from server.wire_results import (  # noqa: F401  (re-exported)
    JSON_CONTENT_TYPE,
    PROTO_CONTENT_TYPE,
    PROTO_RESULT_KINDS,
    EncodedResult,
    downgrade_to_json,
    encode_forward_backward_output,
    encode_result,
    encode_sample_response,
    forward_backward_output_to_json,
    iso_time,
    json_bytes,
    sample_response_to_json,
)
from server.wire_tensors import (  # noqa: F401  (re-exported)
    dense_array,
    densify_csr,
    frombuffer,
    is_int,
    tensor_from_json,
    tensor_from_proto,
)
from tinker_jax.errors import UserError

M = TypeVar("M", bound=pydantic.BaseModel)

# --- bodies ------------------------------------------------------------------------------------------------------


def decompress(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """Undo `Content-Encoding` (only zstd is ever sent, §6), refusing output beyond `max_bytes`."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("identity", ""):
        return body
    if encoding != "zstd":
        raise UserError(f"Content-Encoding: {content_encoding!r} is not supported (only zstd)")
    # Stream instead of trusting the frame header: a frame may omit its content size, or lie about it.
    reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True)
    try:
        out = reader.read(max_bytes + 1)
    except zstandard.ZstdError as e:
        raise UserError(f"request body: invalid zstd data ({e})") from None
    if len(out) > max_bytes:
        raise UserError(f"request body: decompressed size exceeds the {max_bytes}-byte limit")
    return out


def parse_json_object(body: bytes, where: str = "request body") -> dict[str, Any]:
    try:
        obj = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: must be a JSON object, got {type(obj).__name__}")
    return obj


def is_proto(content_type: str | None) -> bool:
    return PROTO_CONTENT_TYPE in (content_type or "").lower()


# --- model input -------------------------------------------------------------------------------------------------

# Chunk classes are StrictBase (extra="forbid"), so unknown keys from newer SDKs must be dropped before building.
_CHUNKS: dict[str, type[pydantic.BaseModel]] = {
    "encoded_text": types.EncodedTextChunk,
    "image": types.ImageChunk,
    "image_asset_pointer": types.ImageAssetPointerChunk,
    "dmel": types.DmelChunk,
}


def _infer_chunk_type(obj: dict[str, Any]) -> str | None:
    # SDK <= 0.17 sends chunks without "type" (§1.4); the payload key says which one it is.
    for key, name in (("tokens", "encoded_text"), ("data", "image"), ("location", "image_asset_pointer"),
                      ("dmel", "dmel")):
        if key in obj:
            return name
    return None


def chunk_from_json(obj: Any, where: str) -> Any:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: must be a chunk object, got {type(obj).__name__}")
    kind = obj.get("type") or _infer_chunk_type(obj)
    if kind not in _CHUNKS:
        raise UserError(f"{where}.type: unknown chunk type {kind!r} (known: {sorted(_CHUNKS)})")
    return parse_request(_CHUNKS[kind], {**obj, "type": kind}, where)


def model_input_from_json(obj: Any, where: str) -> types.ModelInput:
    if isinstance(obj, types.ModelInput):
        return obj
    if not isinstance(obj, dict) or not isinstance(obj.get("chunks"), list):
        raise UserError(f"{where}.chunks: a ModelInput needs a list of chunks")
    chunks = [chunk_from_json(c, f"{where}.chunks[{i}]") for i, c in enumerate(obj["chunks"])]
    return types.ModelInput(chunks=chunks)


def chunk_from_proto(msg: pb.Chunk, where: str) -> Any:
    kind = msg.WhichOneof("chunk")
    if kind == "encoded_text":
        tokens = frombuffer(msg.encoded_text.tokens, np.dtype("<i4"), f"{where}.encoded_text.tokens")
        # Already validated as int32 by construction; skip pydantic's per-token validation of large lists.
        return types.EncodedTextChunk.model_construct(tokens=tokens.tolist(), type="encoded_text")
    if kind == "image":
        img = msg.image
        fields = {"data": img.data, "format": img.format, "type": "image"}
        if img.HasField("expected_tokens"):
            fields["expected_tokens"] = img.expected_tokens
        # override_dimensions has no counterpart in types.ImageChunk; a text-only engine refuses images anyway.
        return parse_request(types.ImageChunk, fields, f"{where}.image")
    if kind == "dmel":
        return types.DmelChunk(dmel=msg.dmel.dmel)
    raise UserError(f"{where}: empty chunk (no encoded_text, image or dmel)")


# --- datums and forward_backward ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardBackwardCall:
    """A decoded /forward_backward (or legacy /forward) body: the SDK request plus the forward-only bit."""

    request: types.ForwardBackwardRequest  # .model_id, .seq_id (None when unset), .forward_backward_input
    forward_only: bool


def datum_from_json(obj: Any, where: str) -> types.Datum:
    """SDK <= 0.24 JSON datum: {"model_input": {"chunks": [...]}, "loss_fn_inputs": {name: TensorData}}."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: must be a Datum object")
    inputs = obj.get("loss_fn_inputs") or {}
    if not isinstance(inputs, dict):
        raise UserError(f"{where}.loss_fn_inputs: must be an object of TensorData")
    return types.Datum(
        model_input=model_input_from_json(obj.get("model_input"), f"{where}.model_input"),
        loss_fn_inputs={k: tensor_from_json(v, f"{where}.loss_fn_inputs.{k}") for k, v in inputs.items()},
    )


def datum_from_proto(msg: pb.Datum, where: str) -> types.Datum:
    mi_spans = [_span(s, f"{where}.model_input_spans[{i}]") for i, s in enumerate(msg.model_input_spans)]
    lf_spans = [_span(s, f"{where}.loss_fn_input_spans[{i}]") for i, s in enumerate(msg.loss_fn_input_spans)]
    has_spans = bool(mi_spans or lf_spans)  # proto cannot tell [] from unset; types.Datum wants both or neither
    return types.Datum(
        model_input=types.ModelInput(
            chunks=[chunk_from_proto(c, f"{where}.model_input[{i}]") for i, c in enumerate(msg.model_input)]),
        loss_fn_inputs={k: tensor_from_proto(v, f"{where}.loss_fn_inputs.{k}") for k, v in msg.loss_fn_inputs.items()},
        model_input_spans=mi_spans if has_spans else None,
        loss_fn_input_spans=lf_spans if has_spans else None,
    )


def _span(msg: pb.ProvenanceSpan, where: str) -> Any:
    kind = msg.WhichOneof("span")
    cls = {"prompt_tokens": types.PromptProvenanceSpan, "sampled_tokens": types.SampledProvenanceSpan}.get(kind)
    if cls is None:
        raise UserError(f"{where}: empty provenance span")
    arm = getattr(msg, kind)
    try:
        return cls(sequence_id=arm.sequence_id, offset=arm.offset, length=arm.length)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def loss_fn_config_from_proto(msg: pb.ForwardBackwardRequest) -> dict[str, float | str] | None:
    """v2 (numbers and strings, SDK >= 0.28) wins when present; the SDK mirrors numbers into v1 for old servers."""
    if msg.loss_fn_config_v2:
        out: dict[str, float | str] = {}
        for key, value in msg.loss_fn_config_v2.items():
            kind = value.WhichOneof("value")
            if kind is None:
                raise UserError(f"loss_fn_config_v2.{key}: value has neither number nor text")
            out[key] = value.number if kind == "number" else value.text
        return out
    return {k: float(v) for k, v in msg.loss_fn_config.items()} or None


def _loss_fn_config_from_json(obj: Any, where: str) -> dict[str, float | str] | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: must be an object of numbers or strings")
    out: dict[str, float | str] = {}
    for key, value in obj.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"{where}.{key}: must be a number or a string, got {value!r}")
        out[key] = value if isinstance(value, str) else float(value)
    return out or None


def decode_forward_backward(body: bytes, content_type: str | None, *,
                            forward_only: bool = False) -> ForwardBackwardCall:
    """Body of POST /forward_backward (proto or JSON, already decompressed) or legacy POST /forward (JSON;
    pass forward_only=True). Routing on Content-Type serves every SDK version at once (§8.2)."""
    if is_proto(content_type):
        msg = pb.ForwardBackwardRequest()
        try:
            msg.ParseFromString(body)
        except Exception as e:  # google.protobuf.message.DecodeError
            raise UserError(f"request body: not a valid ForwardBackwardRequest protobuf ({e})") from None
        fb_input = types.ForwardBackwardInput(
            data=[datum_from_proto(d, f"data[{i}]") for i, d in enumerate(msg.data)],
            loss_fn=msg.loss_fn,
            loss_fn_config=loss_fn_config_from_proto(msg),
        )
        request = types.ForwardBackwardRequest(
            forward_backward_input=fb_input, model_id=msg.model_id, seq_id=msg.seq_id or None)
        return ForwardBackwardCall(request=request, forward_only=forward_only or msg.forward_only)

    obj = parse_json_object(body)
    # The legacy /forward sends forward_input; name that one when neither is there.
    key = "forward_input" if "forward_input" in obj or (forward_only and "forward_backward_input" not in obj) \
        else "forward_backward_input"
    fb = obj.get(key)
    if not isinstance(fb, dict):
        raise UserError(f"{key}: missing (expected {{data, loss_fn, loss_fn_config}})")
    if not isinstance(fb.get("data"), list):
        raise UserError(f"{key}.data: must be a list of Datum")
    if not isinstance(fb.get("loss_fn"), str):
        raise UserError(f"{key}.loss_fn: must be a string")
    model_id, seq_id = obj.get("model_id"), obj.get("seq_id")
    if not isinstance(model_id, str):
        raise UserError("model_id: must be a string")
    if seq_id is not None and not is_int(seq_id):
        raise UserError(f"seq_id: must be an integer, got {seq_id!r}")
    fb_input = types.ForwardBackwardInput(
        data=[datum_from_json(d, f"{key}.data[{i}]") for i, d in enumerate(fb["data"])],
        loss_fn=fb["loss_fn"],
        loss_fn_config=_loss_fn_config_from_json(fb.get("loss_fn_config"), f"{key}.loss_fn_config"),
    )
    request = types.ForwardBackwardRequest(forward_backward_input=fb_input, model_id=model_id, seq_id=seq_id)
    return ForwardBackwardCall(request=request, forward_only=forward_only or key == "forward_input")


# --- lenient JSON -> pydantic request models ---------------------------------------------------------------------


def parse_request(model_cls: type[M], data: Any, where: str | None = None) -> M:
    """Build an SDK request model from JSON the way §1.4 asks: unknown keys dropped (request models forbid extras,
    newer SDKs add fields), null treated as missing, defaults applied, nested chunks typed.

    >>> parse_request(types.OptimStepRequest, {"model_id": "s:train:0", "adam_params": {}, "new_field": 1})
    """
    where = where or model_cls.__name__
    if not isinstance(data, dict):
        raise UserError(f"{where}: must be a JSON object, got {type(data).__name__}")
    try:
        return model_cls.model_validate(_prune(model_cls, data, where))
    except pydantic.ValidationError as e:
        raise UserError(_describe(e, where)) from None


def _prune(model_cls: type[pydantic.BaseModel], data: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, info in model_cls.model_fields.items():
        key = next((k for k in _wire_names(name, info) if data.get(k) is not None), None)
        if key is None:
            if info.is_required() and _admits_none(info.annotation):
                out[name] = None  # e.g. CreateSessionRequest.user_metadata: required but nullable
            continue
        out[key] = _prune_value(info.annotation, data[key], f"{where}.{key}")
    return out


def _wire_names(name: str, info: Any) -> list[str]:
    alias = info.validation_alias
    if isinstance(alias, pydantic.AliasChoices):
        return [c for c in alias.choices if isinstance(c, str)]
    return [alias] if isinstance(alias, str) else [info.alias or name]


def _admits_none(annotation: Any) -> bool:
    return annotation is None or type(None) in typing.get_args(annotation)


def _single_model(annotation: Any) -> Any:
    """The one pydantic model class an annotation means (Optional[X] -> X), else None (plain types, unions)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, _pytypes.UnionType) and len(args) == 1:
        annotation = args[0]
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    return None


def _prune_value(annotation: Any, value: Any, where: str) -> Any:
    model = _single_model(annotation)
    if model is not None and isinstance(value, dict):
        if issubclass(model, types.ModelInput):
            return model_input_from_json(value, where)
        if model.model_config.get("extra") == "allow":
            return value
        return _prune(model, value, where)
    return value


def _describe(err: pydantic.ValidationError, where: str) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])
        parts.append(f"{where}{loc}: {e['msg']}")
    return "; ".join(parts)


