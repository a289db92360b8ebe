"""The paged KV pool through a decode loop, as the sampler runs it (kernels._decode: a device loop of steps that
carries the pool): each step writes its keys and values into the pool in place, with the layer loop rolled or
unrolled (`sampler.decode_unroll`), and both give the same pool and tokens."""

import re

import jax
import jax.numpy as jnp
import models_util
import numpy as np
import pytest
from flax import nnx

from tinker_jax.hf.weights import load_decoder
from tinker_jax.models.decoder import PAGED_INTERPRET, PagedKV, PoolSharding
from tinker_jax.models.sharding import MeshConfig, kv_pool_sharding, make_mesh, state_shardings

L_PAGES, PAGE, ROWS, STEPS = 9, 16, 4, 3


def _loop(unroll: bool, attention: str, mesh=None):
    """A jitted loop of STEPS greedy decode steps over a pool [L,1,Pn,page,K,H], the pool donated as the
    sampler's is; on `mesh`, the weights and the pool placed as the sampler places them, the pool's sharding
    pinned around each step as kernels._decode does. -> (jitted fn, its arguments)."""
    if mesh is None:
        model = models_util.jax_model("tiny-qwen3")
    else:
        placed = lambda st: state_shardings(st, mesh)  # noqa: E731
        model = load_decoder(models_util.tiny_model_dir("tiny-qwen3"), shardings_fn=placed)
    graphdef, state = nnx.split(model)
    cfg = model.cfg
    shape = (cfg.n_layers, 1, L_PAGES, PAGE, cfg.n_kv_heads, cfg.head_dim)
    rng = np.random.default_rng(0)
    pk, pv = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    pool_sh = None if mesh is None else kv_pool_sharding(shape, mesh)
    if pool_sh is not None:
        pk, pv = jax.device_put(pk, pool_sh), jax.device_put(pv, pool_sh)
    pin = (lambda x: x) if pool_sh is None else (lambda x: jax.lax.with_sharding_constraint(x, pool_sh))
    # Each row's own two pages at random places, none on page 0 (the page of rows that write nowhere).
    table = jnp.asarray(rng.permutation(np.arange(1, L_PAGES)).reshape(ROWS, 2), jnp.int32)
    tok = jnp.asarray(rng.integers(3, 100, ROWS), jnp.int32)
    pos = jnp.asarray([3, 9, 17, 20], jnp.int32)  # context lengths: part of a page, past the first

    def loop(state, pk, pv, table, tok, pos):
        m = nnx.merge(graphdef, state)

        def step(i, carry):
            pk, pv, tok = carry
            cache = PagedKV(pin(pk), pin(pv), table, None if pool_sh is None else PoolSharding(pool_sh))
            hidden, cache = m(tok[:, None], (pos + i)[:, None], cache=cache, attention=attention, unroll=unroll)
            return pin(cache.k), pin(cache.v), jnp.argmax(m.logits(hidden)[:, 0], -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, STEPS, step, (pk, pv, tok))

    return jax.jit(loop, donate_argnums=(1, 2)), (state, pk, pv, table, tok, pos)


@pytest.mark.parametrize("attention,mesh", [("reduce", None), ("einsum", None), (PAGED_INTERPRET, None),
                                            ("reduce", MeshConfig(tensor=4))], ids=["reduce", "einsum", "paged",
                                                                                  "reduce-tp4"])
def test_decode_steps_write_the_pool_in_place_rolled_or_unrolled(attention, mesh):
    """The compiled loop copies no pool-sized buffer, rolled or unrolled. Unrolled, each layer's read of the pool
    and the one write after all layers were not ordered by data, and XLA copied the whole pool, k and v twice each,
    every step (x0.15 at batch 1 on the CPU, benchmarks/RESULTS.md); each layer now writes before it reads
    (decoder.LayerCache). The two loops leave the same pool and tokens. For each decode attention: gathering then
    summing products, batched dots, and the paged kernel (in Pallas' interpreter here); and on tensor=4, where
    the pool keeps its 2 kv heads whole while the k / v projections split them: each layer's written pool is
    pinned to the pool's sharding (PagedKV.write), else XLA carried it split like the keys and gathered it back
    whole (10 pool-sized copies and all-gathers in this unrolled loop)."""
    if mesh is not None and len(jax.devices()) < mesh.size:
        pytest.skip(f"needs {mesh.size} devices (conftest.py's XLA_FLAGS)")
    mesh = None if mesh is None else make_mesh(mesh)
    out = {}
    for unroll in (False, True):
        fn, args = _loop(unroll, attention, mesh)
        pool = "f32[" + ",".join(map(str, args[1].shape)) + "]"
        text = fn.lower(*args).compile().as_text()
        copies = re.findall(rf"= {re.escape(pool)}{{[0-9,]*}} (?:copy|all-gather)\(", text)
        assert not copies, f"unroll={unroll}: {len(copies)} pool-sized copies or gathers of {pool} in the loop"
        out[unroll] = [np.asarray(x) for x in fn(*args)]
    for a, b in zip(out[False], out[True]):
        np.testing.assert_allclose(a, b, atol=1e-5)
