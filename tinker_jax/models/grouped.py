"""The grouped matmul of mixture-of-experts layers: rows sorted by group (expert), each group times its own matrix.

`grouped_matmul(x [M,K], w [G,K,N], sizes [G]) -> [M,N]`, row i of group g: x[i] @ w[g]; the groups are consecutive
runs of rows, `sizes[g]` long (as jax.lax.ragged_dot takes them).

Two implementations, both exact:
- "ragged": jax.lax.ragged_dot. On TPUs a grouped kernel; on CPUs and GPUs (jax 0.10/0.11) it lowers to a dense
  product of every row with every group's matrix (then masked), so its cost is G times the useful work
  (benchmarks/RESULTS.md, MoE section).
- "blocked": each group's rows are padded up to whole blocks, every block takes its group's matrix (a gather of
  [blocks, K, N]) and the blocks go through one batched matmul. Static shapes: ceil(M / block) + min(G, M) blocks
  whatever the routing (only a non-empty group leaves a partly filled block, and at most min(G, M) groups are
  non-empty); blocks past the last group's compute zeros. Work: those blocks' rows, and one gathered matrix each.
  On a mesh whose `expert` axis splits w, XLA sums the gathered matrices across that axis instead of keeping each
  expert on its device: use "ragged" there (the engine does).
"auto" (the default) is "ragged" on TPUs and "blocked" elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "ragged", "blocked")


def block_rows(m: int, groups: int) -> int:
    """Rows per block: about the mean rows per group (so padding adds at most about one block per group), a power
    of two between 8 and 128."""
    mean = max(1, m // max(groups, 1))
    return int(min(128, max(8, 1 << (mean.bit_length() - 1))))


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array, impl: str = "auto") -> jax.Array:
    """x [M,K], w [G,K,N], sizes [G] int32 (summing to M) -> [M,N], in x's dtype (w is cast where it is read: an
    int8 w stays int8 in memory)."""
    if impl == "auto":
        impl = "ragged" if jax.default_backend() == "tpu" else "blocked"
    if impl == "ragged":
        return jax.lax.ragged_dot(x, w.astype(x.dtype), sizes)
    if impl != "blocked":
        raise ValueError(f"grouped matmul: expected one of {IMPLS}, got {impl!r}")
    m, k = x.shape
    groups, _, n = w.shape
    bm = block_rows(m, groups)
    n_blocks = -(-m // bm) + min(groups, m)
    ends = jnp.cumsum(sizes)  # [G]
    padded = -(-sizes // bm) * bm  # each group's rows rounded up to whole blocks
    padded_ends = jnp.cumsum(padded)
    rows = jnp.arange(m, dtype=jnp.int32)
    group = jnp.searchsorted(ends, rows, side="right")  # [M]: the group of each row
    pos = rows - (ends - sizes)[group] + (padded_ends - padded)[group]  # [M]: each row's place among the blocks
    xp = jnp.zeros((n_blocks * bm, k), x.dtype).at[pos].set(x, unique_indices=True)
    block_group = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(n_blocks) * bm, side="right"), groups - 1)
    yp = jnp.einsum("bmk,bkn->bmn", xp.reshape(n_blocks, bm, k), w[block_group].astype(x.dtype))
    return yp.reshape(n_blocks * bm, n)[pos]
