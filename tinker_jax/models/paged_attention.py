"""Decode attention that reads a row's KV pages where they lie in the pool: a Pallas kernel (GPU).

The einsum and reduce paths (models.decoder.Attention) first gather each row's pages into a [B, W*page, K, H]
context per layer, which the step then reads again: three passes over the context where one would do (for a
Qwen3-0.6B shape at batch 64 with 384 positions a row, bf16, the context alone is about 2.3x the weights' bytes,
so on a GPU that copy dominates a decode step's memory traffic). This kernel reads
each row's own pages, only those that hold its positions, once, straight from the pool [L,n,Pn,page,K,H], and keeps
the softmax online (flash-decoding style, in fp32), so nothing of the context is written back to memory.

One program per (row, kv head): its G query heads against the row's pages (none past its last step's),
then its own new key and value, given as arguments (the lengths exclude this step's slot, so it is the same
whether the caller writes them into the pool after the layer loop or, unrolled, before the layer reads it).
The layer index comes in as an array (the decode step's layer loop is a scan), so the pool is never sliced.

Where it runs: one device, or a mesh through `sharded_paged_decode_attention` (a shard_map: each device its rows
and kv heads against its own pages), and only where Pallas lowers it (GPU, via Triton).
On other platforms `interpret=True` runs the same kernel in plain XLA, slowly: that is how the CPU tests check it
against `_decode_attention_reduce`. It has never run on a GPU. What was checked without one (2026-12-07): jax
0.10.2 lowers it for CUDA to a Triton module that verifies, and a separately installed Triton 3.9 (not the one
XLA bundles) compiles that for sm_90 and sm_80, at Qwen3-0.6B's shape (28 layers, 8 kv heads of 128, G 2, bf16)
and at G 1, 4 and 8, without register spills at the default pages_per_step. Whether it beats the einsum path is
`bash benchmarks/gpu.sh --decode --variant decode_attention=paged`, not measured yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # as models.decoder: finite, so a row with no context still gives a finite softmax


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _full_spec(pool_spec) -> tuple:
    return tuple(pool_spec) + (None,) * (6 - len(tuple(pool_spec)))


def unsupported(pool_spec, page: int, head_dim: int) -> str | None:
    """Why the kernel cannot serve a pool [L,n,Pn,page,K,H] placed by `pool_spec` (a PartitionSpec; P() on one
    device), or None: it splits a pool only by its shards n and kv heads K, and Triton loads [pages, page, H]
    tiles, powers of two only. The sampler asks at start; the kernel asks again before tracing."""
    spec = _full_spec(pool_spec)
    if any(spec[i] is not None for i in (0, 2, 3, 5)):
        return f"it splits a pool only by its shards and kv heads, not as {pool_spec}"
    if page & (page - 1) or head_dim & (head_dim - 1):
        return f"it needs a power-of-two page size and head_dim, not {page} and {head_dim}"
    return None


def _kernel(layer_ref, table_ref, length_ref, q_ref, kn_ref, vn_ref, pk_ref, pv_ref, o_ref, *, page: int,
            per_step: int, rows_per_shard: int):
    """One (row b, kv head h): q [G,H] (scaled), the row's page ids [W], its context length [1], its new key and
    value [H]; the pools whole. -> o [G,H] fp32. Reads `per_step` pages per loop step (more loads in flight).

    The G query heads are a static loop over [C,H] tiles (C = per_step * page), not one [G,C,H] broadcast:
    compiled for sm_90, the broadcast spilled registers from G * C = 128 on (Triton 3.9's ptxas: 656 bytes at
    G 2, C 64; 46 KB at G 8); per head the largest live tile is the [C,H] page block."""
    from jax.experimental import pallas as pl

    b, h = pl.program_id(0), pl.program_id(1)
    layer, length = layer_ref[0], length_ref[0]
    shard = b // rows_per_shard
    G, H = q_ref.shape
    C = per_step * page  # positions per step
    offsets = jnp.arange(C)
    qs = [q_ref[g, :].astype(jnp.float32) for g in range(G)]  # [H] each

    def body(j, carry):
        pages = table_ref[pl.ds(j * per_step, per_step)]  # [per_step]
        k = pk_ref[layer, shard, pages, :, h, :].reshape(C, H).astype(jnp.float32)
        v = pv_ref[layer, shard, pages, :, h, :].reshape(C, H).astype(jnp.float32)
        valid = j * C + offsets < length
        out = []
        for q, (m, l, acc) in zip(qs, carry):  # m, l scalars, acc [H]: this query head's running softmax
            s = jnp.where(valid, jnp.sum(k * q[None, :], axis=-1), NEG_INF)  # [C]
            m_new = jnp.maximum(m, jnp.max(s))
            scale = jnp.exp(m - m_new)
            e = jnp.exp(s - m_new)  # [C]
            out.append((m_new, l * scale + jnp.sum(e), acc * scale + jnp.sum(e[:, None] * v, axis=0)))
        return tuple(out)

    init = tuple((jnp.float32(NEG_INF), jnp.float32(0), jnp.zeros((H,), jnp.float32)) for _ in range(G))
    carry = jax.lax.fori_loop(0, (length + C - 1) // C, body, init)
    kn, vn = kn_ref[...].astype(jnp.float32), vn_ref[...].astype(jnp.float32)  # [H]
    for g, (q, (m, l, acc)) in enumerate(zip(qs, carry)):
        own = jnp.sum(q * kn)  # the row's own key, always attended
        top = jnp.maximum(m, own)
        scale, e_own = jnp.exp(m - top), jnp.exp(own - top)
        o_ref[g, :] = (acc * scale + e_own * vn) / (l * scale + e_own)


def sharded_paged_decode_attention(qg, k, v, pool_k, pool_v, layer, table, lengths, *, pool_sharding, **kw):
    """`paged_decode_attention` over a mesh: the pool placed by `pool_sharding` (models.sharding.kv_pool_sharding:
    its batch-shards axis n over the batch mesh axes, kv heads over tensor where they divide), each device runs the
    kernel on its own rows and kv heads against its own pages (a row's pages are on its shard: nothing of the pool
    moves). Rows (B of qg, k, v, table, lengths) go over the same axes as the pool's n, kv heads as the pool's K."""
    from jax.sharding import PartitionSpec as P

    why = unsupported(pool_sharding.spec, pool_k.shape[3], pool_k.shape[5])
    if why:
        raise ValueError(f"paged_decode_attention: {why}")
    spec = _full_spec(pool_sharding.spec)
    rows, heads = spec[1], spec[4]
    per_head = P(rows, heads)  # qg [B,K,G,H], k, v [B,K,H] and the output: rows and kv heads as the pool's
    return jax.shard_map(functools.partial(paged_decode_attention, **kw), mesh=pool_sharding.mesh,
                         in_specs=(per_head, per_head, per_head, P(*spec), P(*spec), P(), P(rows), P(rows)),
                         out_specs=per_head, check_vma=False)(qg, k, v, pool_k, pool_v, layer, table, lengths)


def paged_decode_attention(qg: jax.Array, k: jax.Array, v: jax.Array, pool_k: jax.Array, pool_v: jax.Array,
                           layer: jax.Array, table: jax.Array, lengths: jax.Array, *, interpret: bool = False,
                           pages_per_step: int | None = None, num_warps: int = 4) -> jax.Array:
    """qg [B,K,G,H] (scaled queries, G query heads per kv head), k, v [B,K,H] this step's own keys and values,
    pool_k, pool_v [L,n,Pn,page,K,H] (models.decoder.PagedKV), layer: int32 scalar, table [B,W] (row b's pages on
    its batch shard b // (B/n)), lengths [B]: context slots before this step (row b attends to positions
    0 .. lengths[b] - 1 of its pages, then its own key). -> [B,K,G,H] fp32: the same attention as
    models.decoder._decode_attention_reduce over the row's gathered pages, up to summation order. Pages past a
    row's length are not read, except within the kernel's last step (`pages_per_step` pages a step), where
    they are read and masked; lengths must not exceed W * page. pages_per_step None: 8 // G (powers of two, at
    most 4), the most that compiled for sm_90 without spilling registers at H 128 (G 2: 4 pages, 168 registers;
    G 4: 2; G 8: 1, 255 registers)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    B, K, G, H = qg.shape
    L, n, Pn, page, Kp, Hp = pool_k.shape
    if (Kp, Hp) != (K, H) or B % n:
        raise ValueError(f"paged_decode_attention: pool {pool_k.shape} does not fit queries {qg.shape}")
    why = unsupported((), page, H)
    if why:
        raise ValueError(f"paged_decode_attention: {why}")
    # Triton blocks are powers of two: pad the query heads and the page list (a power of two, so whole steps of
    # per_step pages, itself a power of two no larger; the padding pages, page 0, lie past every row's length).
    Gp, W = _pow2(G), _pow2(table.shape[1])
    if pages_per_step is None:
        pages_per_step = max(1, min(4, 8 // Gp))
    per_step = min(_pow2(pages_per_step), W)
    q = jnp.pad(qg, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    table = jnp.pad(table.astype(jnp.int32), ((0, 0), (0, W - table.shape[1])))
    kernel = functools.partial(_kernel, page=page, per_step=per_step, rows_per_shard=B // n)
    whole = lambda shape: pl.BlockSpec(shape, lambda b, h: (0,) * len(shape))  # noqa: E731
    out = pl.pallas_call(
        kernel,
        grid=(B, K),
        in_specs=[
            whole((1,)),  # layer
            pl.BlockSpec((None, W), lambda b, h: (b, 0)),  # the row's pages
            pl.BlockSpec((1,), lambda b, h: (b,)),  # its length
            pl.BlockSpec((None, None, Gp, H), lambda b, h: (b, h, 0, 0)),  # q
            pl.BlockSpec((None, None, H), lambda b, h: (b, h, 0)),  # own key
            pl.BlockSpec((None, None, H), lambda b, h: (b, h, 0)),  # own value
            whole(pool_k.shape),
            whole(pool_v.shape),
        ],
        out_specs=pl.BlockSpec((None, None, Gp, H), lambda b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((B, K, Gp, H), jnp.float32),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        name="paged_decode_attention",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), table, lengths.astype(jnp.int32), q, k, v, pool_k, pool_v)
    return out[:, :, :G]

