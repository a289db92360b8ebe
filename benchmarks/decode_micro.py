"""Where a batch-64 CPU decode step's time goes, part by part, outside the sampler: one layer's decode attention
in several formulations, and the layer loop's weights scanned from a stack or passed per layer.

    python -m benchmarks.decode_micro [--batch 64] [--slots 64] [--json FILE]

Shapes are small-qwen3's (8 layers, d 512, ff 1536, 8 query heads over 4 kv heads of 64), fp32, a paged pool of
577 pages of 16 tokens with each row's pages at random places (as the sampler's after a while). Each variant runs
64 times inside one jitted loop; the figure is the median of 7 such runs, per layer (attention) or per step
(weights). The attention variants compute the same thing (their largest difference to the first: in the JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tinker_jax.models.decoder import NEG_INF, PagedKV, _decode_attention_reduce


def _median_ms(f, *args, per: int) -> float:
    f(*args).block_until_ready()  # compiles
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) / per * 1e3


def attention(B: int, slots: int) -> dict:
    L, Pn, page, K, H, G = 8, 577, 16, 4, 64, 2
    W = slots // page
    rng = np.random.default_rng(0)
    pk = jnp.asarray(rng.standard_normal((L, 1, Pn, page, K, H), np.float32))
    pv = jnp.asarray(rng.standard_normal((L, 1, Pn, page, K, H), np.float32))
    table = jnp.asarray(rng.permutation(np.arange(1, Pn))[: B * W].reshape(B, W).astype(np.int32))
    q = jnp.asarray(rng.standard_normal((B, K, G, H), np.float32)) * 0.125
    k1 = jnp.asarray(rng.standard_normal((B, K, H), np.float32))
    v1 = k1 * 0.5
    mask = jnp.asarray(np.arange(slots)[None, :] < rng.integers(slots // 2, slots, B)[:, None])
    pk2, pv2 = (jnp.transpose(p, (0, 1, 4, 2, 3, 5)) for p in (pk, pv))  # [L,1,K,Pn,page,H]: kv heads first
    qk, k1k, v1k = jnp.transpose(q, (1, 0, 2, 3)), jnp.transpose(k1, (1, 0, 2)), jnp.transpose(v1, (1, 0, 2))

    def finish(s, own, cv, spec_pv, v_own):  # masked softmax over context + own key, then the values
        s = jnp.concatenate([jnp.where(mask[:, None, None], s, NEG_INF), own[..., None]], -1)
        p = jax.nn.softmax(s, -1)
        return jnp.einsum(spec_pv, p[..., :-1], cv) + p[..., -1:] * v_own[:, :, None]

    def reduce_(layer):  # the sampler's CPU default: gathered pages, products and sums
        ck, cv = PagedKV(pk, pv, table).context(layer)
        return _decode_attention_reduce(q, k1, v1, ck, cv, mask)

    def einsum_(layer):  # gathered pages, batched dots
        ck, cv = PagedKV(pk, pv, table).context(layer)
        return finish(jnp.einsum("BKGH,BSKH->BKGS", q, ck), jnp.einsum("BKGH,BKH->BKG", q, k1), cv,
                      "BKGS,BSKH->BKGH", v1)

    def kv_heads_first(layer):  # a pool laid out [L,n,K,Pn,page,H]: the gather gives the dots' layout
        ck = pk2[layer, 0][:, table].reshape(K, B, -1, H)
        cv = pv2[layer, 0][:, table].reshape(K, B, -1, H)
        s = jnp.einsum("KBGH,KBSH->KBGS", qk, ck)
        own = jnp.einsum("KBGH,KBH->KBG", qk, k1k)[..., None]
        s = jnp.concatenate([jnp.where(mask[None, :, None], s, NEG_INF), own], -1)
        p = jax.nn.softmax(s, -1)
        o = jnp.einsum("KBGS,KBSH->KBGH", p[..., :-1], cv) + p[..., -1:] * v1k[:, :, None]
        return jnp.transpose(o, (1, 0, 2, 3))

    dk = jnp.asarray(rng.standard_normal((L, B, slots, K, H), np.float32))
    dv = dk * 0.5

    def dense_reduce(layer):  # no pages: a contiguous context per row (what the products cost alone)
        return _decode_attention_reduce(q, k1, v1, dk[layer], dv[layer], mask)

    def gather_only(layer):  # the pages gathered and summed (what the gathers cost, nearly alone)
        ck, cv = PagedKV(pk, pv, table).context(layer)
        return (jnp.sum(ck, 1) + jnp.sum(cv, 1))[:, :, None, :] + jnp.zeros_like(q)

    acc = jnp.zeros((B, K, G, H), jnp.float32)
    out, first = {}, None
    for name, fn in [("reduce", reduce_), ("einsum", einsum_), ("kv_heads_first", kv_heads_first),
                     ("dense_reduce", dense_reduce), ("gather_only", gather_only)]:
        f = jax.jit(lambda a, fn=fn: jax.lax.fori_loop(0, 64, lambda i, x: x + fn(i % L), a))
        ms = _median_ms(f, acc, per=64)
        diff = None
        if name not in ("dense_reduce", "gather_only"):
            r = f(acc)
            first = r if first is None else first
            diff = float(jnp.abs(r - first).max())
        out[name] = {"ms_per_layer": ms, "max_diff_to_reduce": diff}
        print(f"[decode_micro] attention {name}: {ms:.3f} ms per layer", flush=True)
    out["context_bytes_per_layer"] = 2 * B * slots * K * H * 4
    return out


def weights(B: int) -> dict:
    L, D, F = 8, 512, 1536
    rng = np.random.default_rng(0)
    shapes = dict(q=(D, D), k=(D, 256), v=(D, 256), o=(D, D), g=(D, F), u=(D, F), d=(F, D))
    W = {n: jnp.asarray(rng.standard_normal((L,) + s, np.float32) * 0.02) for n, s in shapes.items()}
    per_layer = [{n: a[i] for n, a in W.items()} for i in range(L)]
    x = jnp.asarray(rng.standard_normal((B, D), np.float32))

    def layer(h, w):
        h = h + (h @ w["q"] + jnp.concatenate([h @ w["k"], h @ w["v"]], -1)) @ w["o"]
        return h + (jax.nn.silu(h @ w["g"]) * (h @ w["u"])) @ w["d"]

    scanned = jax.jit(lambda x, W: jax.lax.fori_loop(
        0, 8, lambda i, h: jax.lax.scan(lambda h, w: (layer(h, w), None), h, W)[0], x))

    def unrolled(x, ws):
        def step(i, h):
            for w in ws:
                h = layer(h, w)
            return h
        return jax.lax.fori_loop(0, 8, step, x)

    out = {"scanned_stack_ms_per_step": _median_ms(scanned, x, W, per=8),
           "per_layer_arrays_ms_per_step": _median_ms(jax.jit(unrolled), x, per_layer, per=8)}
    print(f"[decode_micro] weights: {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_micro", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--slots", type=int, default=64, help="the decode view: context slots each row attends over")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from benchmarks.timing import machine_info, versions

    out = {"what": __doc__.splitlines()[0], "batch": args.batch, "slots": args.slots, "machine": machine_info(),
           "versions": versions(), "attention": attention(args.batch, args.slots), "weights": weights(args.batch)}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
