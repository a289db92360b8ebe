"""The SDK's TensorData as numpy: one place that densifies a tensor, sparse CSR or dense, with the checks a client's
tensor must pass (errors name the field). The engine uses it for request tensors that keep their layout (e.g.
`target_prompt_logprobs`, whose answer mirrors it); the REST server's wire decoding uses the same functions."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tinker import types

from tinker_jax.errors import UserError

NUMPY_OF = {"float32": np.dtype(np.float32), "int64": np.dtype(np.int64)}
MAX_DENSE_ELEMENTS = 1 << 28  # 1 GiB of float32; real inputs (tokens x top-K) are orders of magnitude smaller


def reshape_to(values: np.ndarray, shape: list[int] | None, where: str) -> np.ndarray:
    """Flat values -> `shape` (None: flat), or a UserError naming `where` when they do not fill it."""
    if shape is None:
        return values.reshape(-1)
    if math.prod(shape) != values.size:
        raise UserError(f"{where}: {values.size} values do not fill shape {shape}")
    return values.reshape(shape)


def densify_csr(values: np.ndarray, crow: np.ndarray, col: np.ndarray, shape: list[int] | None,
                pad_value: float, where: str) -> np.ndarray:
    """CSR (values row-major, crow [nrows+1], col [nnz]) -> dense [nrows, ncols]; unlisted cells get `pad_value`."""
    if shape is None or len(shape) != 2:
        raise UserError(f"{where}.shape: a sparse CSR tensor needs a 2-D dense shape, got {shape!r}")
    nrows, ncols = shape
    if nrows * ncols > MAX_DENSE_ELEMENTS:  # a few bytes of CSR must not be able to demand gigabytes
        raise UserError(f"{where}.shape: {shape} exceeds {MAX_DENSE_ELEMENTS} elements")
    nnz = values.size
    if crow.size != nrows + 1 or crow[0] != 0 or crow[-1] != nnz or np.any(np.diff(crow) < 0):
        raise UserError(f"{where}.sparse_crow_indices: must be {nrows + 1} non-decreasing offsets from 0 to {nnz}")
    if col.size != nnz or (nnz and (col.min() < 0 or col.max() >= ncols)):
        raise UserError(f"{where}.sparse_col_indices: must be {nnz} column indices in [0, {ncols})")
    dense = np.full((nrows, ncols), pad_value, dtype=values.dtype)
    dense[np.repeat(np.arange(nrows), np.diff(crow)), col] = values
    return dense


def dense_array(td: Any, pad_value: float = 0, where: str = "tensor") -> np.ndarray:
    """Any TensorData (dataclass or the SDK's pydantic JSON model), sparse or not, as a dense numpy array.

    For the engine: e.g. `SampleRequest.target_prompt_logprobs` stays sparse after decoding (its layout must be
    mirrored in the response) and is densified with pad_value=-1 (wire doc §4.2)."""
    if isinstance(td, np.ndarray):
        return td
    np_dtype = NUMPY_OF[td.dtype]
    raw = td._numpy if isinstance(td, types.TensorData) else np.asarray(td.data, dtype=np_dtype)
    shape = list(td.shape) if td.shape is not None else None
    if shape is None and td.sparse_crow_indices is None:
        shape = list(raw.shape)  # the SDK type keeps an unshaped array as given
    values = np.asarray(raw, dtype=np_dtype).reshape(-1)
    if td.sparse_crow_indices is not None:
        crow = np.asarray(td.sparse_crow_indices, dtype=np.int64)
        col = np.asarray(td.sparse_col_indices if td.sparse_col_indices is not None else [], dtype=np.int64)
        return densify_csr(values, crow, col, shape, pad_value, where)
    return reshape_to(values, shape, where)
