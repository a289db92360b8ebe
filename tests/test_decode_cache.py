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

from tinker_jax.models.decoder import PAGED_INTERPRET, PagedKV

L_PAGES, PAGE, ROWS, STEPS = 9, 16, 4, 3


def _loop(unroll: bool, attention: str):
    """A jitted loop of STEPS greedy decode steps over a pool [L,1,Pn,page,K,H], the pool donated as the
    sampler's is. -> (jitted fn, its arguments)."""
    model = models_util.jax_model("tiny-qwen3")
    graphdef, state = nnx.split(model)
    cfg = model.cfg
    shape = (cfg.n_layers, 1, L_PAGES, PAGE, cfg.n_kv_heads, cfg.head_dim)
    rng = np.random.default_rng(0)
    pk, pv = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    # Each row's own two pages at random places, none on page 0 (the page of rows that write nowhere).
    table = jnp.asarray(rng.permutation(np.arange(1, L_PAGES)).reshape(ROWS, 2), jnp.int32)
    tok = jnp.asarray(rng.integers(3, 100, ROWS), jnp.int32)
    pos = jnp.asarray([3, 9, 17, 20], jnp.int32)  # context lengths: part of a page, past the first

    def loop(state, pk, pv, table, tok, pos):
        m = nnx.merge(graphdef, state)

        def step(i, carry):
            pk, pv, tok = carry
            hidden, cache = m(tok[:, None], (pos + i)[:, None], cache=PagedKV(pk, pv, table), attention=attention,
                              unroll=unroll)
            return cache.k, cache.v, jnp.argmax(m.logits(hidden)[:, 0], -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, STEPS, step, (pk, pv, tok))

    return jax.jit(loop, donate_argnums=(1, 2)), (state, pk, pv, table, tok, pos)


@pytest.mark.parametrize("attention", ["reduce", "einsum", PAGED_INTERPRET])
def test_decode_steps_write_the_pool_in_place_rolled_or_unrolled(attention):
    """The compiled loop copies no pool-sized buffer, rolled or unrolled. Unrolled, each layer's read of the pool
    and the one write after all layers were not ordered by data, and XLA copied the whole pool, k and v twice each,
    every step (x0.15 at batch 1 on the CPU, benchmarks/RESULTS.md); each layer now writes before it reads
    (decoder.LayerCache). The two loops leave the same pool and tokens. For each decode attention: gathering then
    summing products, batched dots, and the paged kernel (in Pallas' interpreter here)."""
    out = {}
    for unroll in (False, True):
        fn, args = _loop(unroll, attention)
        pool = "f32[" + ",".join(map(str, args[1].shape)) + "]"
        text = fn.lower(*args).compile().as_text()
        copies = re.findall(rf"= {re.escape(pool)}{{[0-9,]*}} copy\(", text)
        assert not copies, f"unroll={unroll}: {len(copies)} copies of the pool {pool} in the compiled loop"
        out[unroll] = [np.asarray(x) for x in fn(*args)]
    for a, b in zip(out[False], out[True]):
        np.testing.assert_allclose(a, b, atol=1e-5)
