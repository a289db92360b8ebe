"""The chip's measured matmul peak (the MFU denominator): an n x n x n matmul, 2 n^3 FLOPs, in jax and in torch,
median of timed runs after warm-up. GPU suite: bf16 at 8192; CPU suite: fp32 at 2048."""

from __future__ import annotations

from benchmarks.timing import Stat, time_runs


def jax_peak(n: int, dtype: str, repeats: int = 10) -> Stat:
    import jax
    import jax.numpy as jnp

    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dt)
    b = jax.random.normal(kb, (n, n), dt)
    mm = jax.jit(lambda x, y: x @ y)
    secs = time_runs(lambda: mm(a, b).block_until_ready(), warmup=2, repeats=repeats)
    del a, b
    return secs.map(lambda s: 2.0 * n ** 3 / s)


def torch_peak(n: int, dtype: str, repeats: int = 10) -> Stat:
    import torch

    from benchmarks.peers_torch import device, free_memory, sync

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    a = torch.randn(n, n, device=device(), dtype=dt)
    b = torch.randn(n, n, device=device(), dtype=dt)

    def mm():
        torch.matmul(a, b)
        sync()
    secs = time_runs(mm, warmup=2, repeats=repeats)
    del a, b
    free_memory()
    return secs.map(lambda s: 2.0 * n ** 3 / s)
