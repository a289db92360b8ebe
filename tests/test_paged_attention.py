"""The paged decode-attention kernel (models.paged_attention) against attention over gathered pages, in Pallas'
interpreter (this CPU): pages on two batch shards, every layer of the pool, a query-head count and a page list
that are not powers of two (padded inside), rows with no context, part of a page and several pages, read one,
two or four pages a step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinker_jax.models.decoder import PagedKV, _decode_attention_reduce
from tinker_jax.models.paged_attention import paged_decode_attention, sharded_paged_decode_attention
from tinker_jax.models.sharding import MeshConfig, kv_pool_sharding, make_mesh


def reference(qg, k, v, pool_k, pool_v, layer, table, lengths) -> jax.Array:
    """The same attention over each row's gathered pages [B, W*page, K, H] (PagedKV.context), masked by lengths."""
    ck, cv = PagedKV(pool_k, pool_v, table).context(layer)
    mask = jnp.arange(ck.shape[1])[None, :] < lengths[:, None]
    return _decode_attention_reduce(qg, k, v, ck, cv, mask)


@pytest.mark.parametrize("dtype,per_step", [(jnp.float32, 1), (jnp.float32, 4), (jnp.bfloat16, 2)])
def test_the_kernel_equals_attention_over_gathered_pages(dtype, per_step):
    L, n, Pn, page, K, H, G, B, W = 3, 2, 9, 16, 2, 64, 3, 4, 3
    rng = np.random.default_rng(0)
    pool = lambda: jnp.asarray(rng.standard_normal((L, n, Pn, page, K, H)), dtype)  # noqa: E731
    pk, pv = pool(), pool()
    table = jnp.asarray(rng.integers(1, Pn, (B, W)), jnp.int32)
    q = jnp.asarray(rng.standard_normal((B, K, G, H)) * 0.125, dtype)
    k, v = (jnp.asarray(rng.standard_normal((B, K, H)), dtype) for _ in range(2))
    lengths = jnp.asarray([0, 17, 48, 5], jnp.int32)
    run = jax.jit(lambda *a: paged_decode_attention(*a, interpret=True, pages_per_step=per_step))
    for layer in range(L):
        got = run(q, k, v, pk, pv, jnp.int32(layer), table, lengths)
        want = reference(q, k, v, pk, pv, jnp.int32(layer), table, lengths)
        assert got.shape == (B, K, G, H) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    # a row with no context reads no page: garbage in its pages changes nothing
    junk = pk.at[:, :, table[0, 0]].set(jnp.asarray(1e4, dtype))  # row 0 has no context
    np.testing.assert_array_equal(np.asarray(run(q, k, v, junk, pv, jnp.int32(1), table, lengths))[0],
                                  np.asarray(run(q, k, v, pk, pv, jnp.int32(1), table, lengths))[0])


def test_the_kernel_lowers_for_a_gpu_through_triton():
    """Without a GPU: the kernel at Qwen3-0.6B's decode shape (28 layers, 8 kv heads of 128, 2 query heads each,
    bf16 pool of 577 pages, batch 64) lowers for CUDA, i.e. Pallas' Triton lowering accepts every op in it and the
    module holds the Triton call. (jax >= 0.11 asks a real GPU for its properties while lowering: skipped there.)"""
    f = jax.ShapeDtypeStruct
    B, K, G, H, L, Pn, page, W = 64, 8, 2, 128, 28, 577, 16, 24
    args = (f((B, K, G, H), jnp.bfloat16), f((B, K, H), jnp.bfloat16), f((B, K, H), jnp.bfloat16),
            f((L, 1, Pn, page, K, H), jnp.bfloat16), f((L, 1, Pn, page, K, H), jnp.bfloat16), f((), jnp.int32),
            f((B, W), jnp.int32), f((B,), jnp.int32))
    try:
        text = jax.jit(paged_decode_attention).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as e:  # noqa: BLE001
        if "gpu" in str(e).lower() and tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11):
            pytest.skip(f"this jax lowers Triton kernels only with a GPU present: {e}")
        raise
    assert "triton" in text


@pytest.mark.parametrize("mc", [MeshConfig(data=2, tensor=2), MeshConfig(data=2, fsdp=2, tensor=2)],
                         ids=["dp2xtp2", "dp2xfsdp2xtp2"])
def test_over_a_mesh_each_device_reads_its_own_rows_pages(mc):
    """The shard_map form: rows and their pages over the batch axes, kv heads over tensor; every row's pages at
    different places on each shard (so a row paired with another shard's table or pool would read other keys).
    Equal to the kernel run whole on one device."""
    if len(jax.devices()) < mc.size:
        pytest.skip(f"needs {mc.size} devices (conftest.py's XLA_FLAGS)")
    mesh = make_mesh(mc)
    n = mc.data * mc.fsdp
    L, Pn, page, K, H, G, B, W = 2, 12, 16, 2, 64, 2, 4 * n, 3
    rng = np.random.default_rng(1)
    pk, pv = (jnp.asarray(rng.standard_normal((L, n, Pn, page, K, H)), jnp.float32) for _ in range(2))
    table = jnp.asarray(np.stack([rng.permutation(np.arange(1, Pn))[:W] for _ in range(B)]), jnp.int32)
    q = jnp.asarray(rng.standard_normal((B, K, G, H)) * 0.125, jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, K, H)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray(rng.integers(0, W * page, B), jnp.int32)
    want = paged_decode_attention(q, k, v, pk, pv, jnp.int32(1), table, lengths, interpret=True)
    pool_sh = kv_pool_sharding(pk.shape, mesh)
    assert pool_sh.spec[1] is not None and pool_sh.spec[4] == "tensor"  # really split: rows and kv heads
    got = jax.jit(lambda *a: sharded_paged_decode_attention(*a, interpret=True, pool_sharding=pool_sh))(
        q, k, v, jax.device_put(pk, pool_sh), jax.device_put(pv, pool_sh), jnp.int32(1), table, lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_a_write_leaves_positions_before_write_from_unwritten():
    """PagedKV.write with write_from (a chunk that recomputes a position of a shared page to score the token after
    it): that position goes to the scratch page 0, the rest of the chunk to the row's pages; rows on two shards."""
    L, n, Pn, page, K, H = 2, 2, 4, 2, 1, 1
    zeros = jnp.zeros((L, n, Pn, page, K, H), jnp.float32)
    table = jnp.asarray([[1, 2, 3], [3, 1, 2]], jnp.int32)  # row 0 on shard 0, row 1 on shard 1
    positions = jnp.asarray([[1, 2, 3], [2, 3, 4]], jnp.int32)
    new = jnp.broadcast_to(jnp.arange(1.0, 7.0).reshape(1, 2, 3, 1, 1), (L, 2, 3, K, H))
    out = PagedKV(zeros, zeros, table, write_from=jnp.asarray([2, 2], jnp.int32)).write(new, new, positions)
    got = np.asarray(out.k[0, ..., 0, 0])  # [n, Pn, page]
    want = np.zeros((n, Pn, page))
    want[0, 0, 1] = 1.0  # row 0's position 1 (in its shared page 1): into scratch
    want[0, 2] = [2.0, 3.0]  # positions 2, 3: its page 2
    want[1, 1] = [4.0, 5.0]  # row 1's positions 2, 3: its page 1 (table[1, 1])
    want[1, 2, 0] = 6.0  # position 4: page 2, slot 0
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(out.v), np.asarray(out.k))
    plain = PagedKV(zeros, zeros, table).write(new, new, positions)  # without: position 1 lands in page 1
    assert float(plain.k[0, 0, 1, 1, 0, 0]) == 1.0 and float(plain.k[0, 0, 0, 1, 0, 0]) == 0.0
