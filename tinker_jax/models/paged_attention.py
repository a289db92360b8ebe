"""Decode attention that reads a row's KV pages where they lie in the pool: a Pallas kernel (GPU).

The einsum and reduce paths (models.decoder.Attention) first gather each row's pages into a [B, W*page, K, H]
context per layer, which the step then reads again: on a GPU that copy is most of a decode step's memory traffic
(for a Qwen3-0.6B shape at batch 64 with 384 positions, about 3x the bytes of the weights). This kernel reads
each row's own pages, only those that hold its positions, once, straight from the pool [L,n,Pn,page,K,H], and keeps
the softmax online (flash-decoding style, in fp32), so nothing of the context is written back to memory.

One program per (row, kv head): its G query heads against the row's pages (pages past its length are not read),
then its own new key and value (this step's, not in the pool yet: the caller writes them after the layer loop).
The layer index comes in as an array (the decode step's layer loop is a scan), so the pool is never sliced.

Where it runs: one device only (no shard_map over a mesh yet), and only where Pallas lowers it (GPU, via Triton).
On other platforms `interpret=True` runs the same kernel in plain XLA, slowly: that is how the CPU tests check it
against `_decode_attention_reduce`. Whether it beats the einsum path on a GPU has not been measured (no GPU was
lent since it was written): `bash benchmarks/gpu.sh --decode --set decode_attention=paged` is the A/B.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # as models.decoder: finite, so a row with no context still gives a finite softmax


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _kernel(layer_ref, table_ref, length_ref, q_ref, kn_ref, vn_ref, pk_ref, pv_ref, o_ref, *, page: int,
            rows_per_shard: int):
    """One (row b, kv head h): q [G,H] (scaled), the row's page ids [W], its context length [1], its new key and
    value [H]; the pools whole. -> o [G,H] fp32."""
    from jax.experimental import pallas as pl

    b, h = pl.program_id(0), pl.program_id(1)
    layer, length = layer_ref[0], length_ref[0]
    shard = b // rows_per_shard
    q = q_ref[...].astype(jnp.float32)  # [G,H]
    G, H = q.shape
    offsets = jnp.arange(page)

    def body(j, carry):
        m, l, acc = carry  # [G], [G], [G,H]
        p = table_ref[j]
        k = pk_ref[layer, shard, p, :, h, :].astype(jnp.float32)  # [page,H]
        v = pv_ref[layer, shard, p, :, h, :].astype(jnp.float32)
        s = jnp.sum(q[:, None, :] * k[None, :, :], axis=-1)  # [G,page]
        s = jnp.where((j * page + offsets < length)[None, :], s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        scale = jnp.exp(m - m_new)
        e = jnp.exp(s - m_new[:, None])  # [G,page]
        l_new = l * scale + jnp.sum(e, axis=-1)
        acc = acc * scale[:, None] + jnp.sum(e[:, :, None] * v[None, :, :], axis=1)
        return m_new, l_new, acc

    init = (jnp.full((G,), NEG_INF, jnp.float32), jnp.zeros((G,), jnp.float32), jnp.zeros((G, H), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, (length + page - 1) // page, body, init)
    kn, vn = kn_ref[...].astype(jnp.float32), vn_ref[...].astype(jnp.float32)  # [H]
    own = jnp.sum(q * kn[None, :], axis=-1)  # [G]: the row's own key, always attended
    top = jnp.maximum(m, own)
    scale, e_own = jnp.exp(m - top), jnp.exp(own - top)
    o_ref[...] = (acc * scale[:, None] + e_own[:, None] * vn[None, :]) / (l * scale + e_own)[:, None]


def paged_decode_attention(qg: jax.Array, k: jax.Array, v: jax.Array, pool_k: jax.Array, pool_v: jax.Array,
                           layer: jax.Array, table: jax.Array, lengths: jax.Array, *, interpret: bool = False,
                           num_warps: int = 4) -> jax.Array:
    """qg [B,K,G,H] (scaled queries, G query heads per kv head), k, v [B,K,H] this step's own keys and values,
    pool_k, pool_v [L,n,Pn,page,K,H] (models.decoder.PagedKV), layer: int32 scalar, table [B,W] (row b's pages on
    its batch shard b // (B/n)), lengths [B]: context slots before this step (row b attends to positions
    0 .. lengths[b] - 1 of its pages, then its own key). -> [B,K,G,H] fp32: the same attention as
    models.decoder._decode_attention_reduce over the row's gathered pages, up to summation order."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    B, K, G, H = qg.shape
    L, n, Pn, page, Kp, Hp = pool_k.shape
    if (Kp, Hp) != (K, H) or B % n:
        raise ValueError(f"paged_decode_attention: pool {pool_k.shape} does not fit queries {qg.shape}")
    # Triton blocks are powers of two: pad the query heads and the page list (pages past a row's length are
    # never read, so the padding pages are not either).
    Gp, W = _pow2(G), _pow2(table.shape[1])
    q = jnp.pad(qg, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    table = jnp.pad(table.astype(jnp.int32), ((0, 0), (0, W - table.shape[1])))
    kernel = functools.partial(_kernel, page=page, rows_per_shard=B // n)
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

