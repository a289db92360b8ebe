"""Numeric arrays on the wire (wire doc §4.2, §6): JSON TensorData, proto Tensor (dense or CSR), little-endian
packing. Shared by request decoding (server.wire) and result encoding (server.wire_results).

Errors name the path of the field at fault. Decoding a client's tensor raises `UserError`; the encoders' own checks
(`as_array`, `int32_bytes`) raise ValueError, an engine bug. Result encoding runs under FutureRegistry, which
reports any exception there as a server error, so the shared checks (`densify_csr`) are right for both.
Densifying a TensorData (`dense_array`, `densify_csr`) lives in the core (tinker_jax.tensors), which the engine
uses too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

from tinker_jax.errors import UserError
from tinker_jax.tensors import NUMPY_OF, dense_array, densify_csr, reshape_to  # noqa: F401  (dense_array re-exported)

_PROTO_DTYPES: dict[int, tuple[np.dtype, str]] = {  # proto enum -> (little-endian wire dtype, TensorData dtype)
    pb.DTYPE_FLOAT32: (np.dtype("<f4"), "float32"),
    pb.DTYPE_INT64: (np.dtype("<i8"), "int64"),
    pb.DTYPE_INT32: (np.dtype("<i4"), "int64"),  # widened, as the SDK does on responses
    pb.DTYPE_BFLOAT16: (np.dtype("<u2"), "float32"),
}
PROTO_OF = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64}


def _shape(shape: Any, where: str) -> list[int] | None:
    if shape is None:
        return None
    if not isinstance(shape, (list, tuple)) or not all(is_int(d) and d >= 0 for d in shape):
        raise UserError(f"{where}.shape: must be a list of non-negative integers, got {shape!r}")
    return [int(d) for d in shape]


def is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def tensor_from_json(obj: Any, where: str, pad_value: float = 0) -> types.TensorData:
    """JSON TensorData (§4.2) -> dense `types.TensorData`; CSR cells not listed get `pad_value`."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: must be a TensorData object, got {type(obj).__name__}")
    dtype = obj.get("dtype")
    if dtype not in NUMPY_OF:
        raise UserError(f"{where}.dtype: must be 'int64' or 'float32', got {dtype!r}")
    values = _json_numbers(obj.get("data"), dtype, f"{where}.data")
    shape = _shape(obj.get("shape"), where)
    crow, col = obj.get("sparse_crow_indices"), obj.get("sparse_col_indices")
    if crow is not None or col is not None:
        crow_a = _json_numbers(crow, "int64", f"{where}.sparse_crow_indices")
        col_a = _json_numbers(col, "int64", f"{where}.sparse_col_indices")
        dense = densify_csr(values, crow_a, col_a, shape, pad_value, where)
    else:
        dense = reshape_to(values, shape, f"{where}.data")
    return types.TensorData(data=dense, dtype=dtype, shape=list(dense.shape))


def _json_numbers(data: Any, dtype: str, where: str) -> np.ndarray:
    if not isinstance(data, list):
        raise UserError(f"{where}: must be a flat list of numbers")
    try:
        raw = np.asarray(data)
    except ValueError:
        raise UserError(f"{where}: must be a flat list of numbers") from None
    if raw.size and (raw.ndim != 1 or raw.dtype.kind not in "biuf"):
        raise UserError(f"{where}: must be a flat list of numbers")
    if dtype == "int64" and raw.dtype.kind == "f" and not np.all(np.mod(raw, 1) == 0):
        raise UserError(f"{where}: int64 tensor holds non-integer values")
    return raw.astype(NUMPY_OF[dtype])


def tensor_from_proto(msg: pb.Tensor, where: str, pad_value: float = 0) -> types.TensorData:
    """proto `Tensor` (dense bytes or CSR) -> dense `types.TensorData`."""
    if msg.dtype not in _PROTO_DTYPES:
        raise UserError(f"{where}.dtype: unsupported proto dtype {msg.dtype}")
    wire_dtype, dtype = _PROTO_DTYPES[msg.dtype]
    shape = list(msg.shape) or None
    kind = msg.WhichOneof("encoding")
    if kind == "sparse_csr":
        values = _widen(frombuffer(msg.sparse_csr.values, wire_dtype, f"{where}.sparse_csr.values"), msg.dtype)
        crow = frombuffer(msg.sparse_csr.crow_indices, np.dtype("<i8"), f"{where}.sparse_csr.crow_indices")
        col = frombuffer(msg.sparse_csr.col_indices, np.dtype("<i8"), f"{where}.sparse_csr.col_indices")
        dense = densify_csr(values, crow, col, shape, pad_value, where)
    else:  # `dense` (an unset oneof is an empty dense tensor)
        dense = reshape_to(_widen(frombuffer(msg.dense, wire_dtype, f"{where}.dense"), msg.dtype), shape, where)
    return types.TensorData(data=dense, dtype=dtype, shape=list(dense.shape))


def frombuffer(buf: bytes, dtype: np.dtype, where: str) -> np.ndarray:
    if len(buf) % dtype.itemsize:
        raise UserError(f"{where}: {len(buf)} bytes is not a whole number of {dtype.itemsize}-byte values")
    return np.frombuffer(buf, dtype=dtype)


def _widen(arr: np.ndarray, proto_dtype: int) -> np.ndarray:
    if proto_dtype == pb.DTYPE_BFLOAT16:  # bf16 is the top half of a float32
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(NUMPY_OF[_PROTO_DTYPES[proto_dtype][1]])  # native byte order, writable copy


def as_array(value: Any, where: str) -> tuple[np.ndarray, int]:
    """A loss_fn_outputs entry (TensorData, or a numpy array for engine convenience) -> (dense array, proto dtype)."""
    if isinstance(value, np.ndarray):
        dtype = "float32" if value.dtype.kind == "f" else "int64"
        arr = value.astype(NUMPY_OF[dtype], copy=False)
    elif hasattr(value, "dtype") and value.dtype in NUMPY_OF:
        dtype, arr = value.dtype, dense_array(value)
    else:
        raise ValueError(f"{where}: must be a TensorData or numpy array, got {type(value).__name__}")
    return (arr.reshape(1) if arr.ndim == 0 else arr), PROTO_OF[dtype]


def int32_bytes(values: Any, where: str) -> bytes:
    arr = np.asarray(values, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < -(2**31) or arr.max() >= 2**31):
        raise ValueError(f"{where}: token id out of int32 range")
    return arr.astype("<i4").tobytes()


def proto_tensor(td: Any, where: str, dtype: str) -> pb.Tensor:
    """TensorData (or numpy array) -> proto Tensor of `dtype`, keeping a CSR layout as CSR
    (SampleResponse.target_prompt_logprobs mirrors the layout of the request's)."""
    wire = np.dtype("<f4") if dtype == "float32" else np.dtype("<i8")
    msg = pb.Tensor(dtype=pb.DTYPE_FLOAT32 if dtype == "float32" else pb.DTYPE_INT64)
    if getattr(td, "sparse_crow_indices", None) is not None:
        values = np.asarray(td._numpy if isinstance(td, types.TensorData) else td.data).reshape(-1)
        crow = np.asarray(td.sparse_crow_indices, dtype="<i8")
        col = np.asarray(td.sparse_col_indices or [], dtype="<i8")
        densify_csr(values, crow, col, td.shape, 0, where)  # validates the layout before the client sees it
        msg.shape.extend(td.shape)
        msg.sparse_csr.values = values.astype(wire).tobytes()
        msg.sparse_csr.crow_indices = crow.tobytes()
        msg.sparse_csr.col_indices = col.tobytes()
    else:
        arr = dense_array(td)
        msg.shape.extend(arr.shape)
        msg.dense = arr.astype(wire).tobytes()
    return msg
