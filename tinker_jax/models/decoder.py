"""One decoder for Llama 3, Qwen2/2.5 and Qwen3 (Flax NNX). Family differences are ModelConfig fields.

Dimension legend: B batch, T query length, S key/cache length, D d_model, N query heads, K kv heads,
G = N // K, H head_dim, F d_ff, V vocab, R LoRA rank, L layers (E experts of width I in a mixture-of-experts
feed-forward: models.moe).

Layers are stacked: every block parameter has a leading [L] axis and the forward pass is one `lax.scan`,
so compile time does not grow with depth. A MoE model with dense layers among its MoE ones has two stacks
(`blocks`, its MoE layers; `dense_blocks`, its dense ones), scanned in layer order by runs of a repeating unit
(layer_groups). Numerics follow transformers: RMSNorm and softmax in fp32,
RoPE tables in fp32 then cast, logits returned in fp32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tinker_jax.models import lora as lora_math
from tinker_jax.models.config import STACKS, ModelConfig
from tinker_jax.models.lora import LoraRows
from tinker_jax.models.moe import MoeMLP, row_router_stats
from tinker_jax.models.paged_attention import paged_decode_attention, sharded_paged_decode_attention

ATTENTION_IMPLS = ("einsum", "cudnn", "xla")
# With a cache: how a one-token step (decode) attends. "einsum" gathers each row's context and runs two batched
# dots; "reduce" computes the same sums as elementwise products reduced over head_dim and over the context (fp32),
# which needs no transposed copy of the context for the dots (XLA:CPU still gathers the pages; see Attention).
DECODE_ATTENTION = ("einsum", "reduce", "paged")
# "paged" run by Pallas' interpreter (plain XLA): where Pallas does not lower the kernel (CPU tests).
PAGED_INTERPRET = "paged-interpret"
NEG_INF = -1e30  # finite, so fully masked rows (padding) give a uniform softmax instead of NaN


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, S, K, H]; slot index == absolute position
    v: jax.Array  # [L, B, S, K, H]

    @staticmethod
    def init(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def context(self, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Layer `layer`'s cache [B,S,K,H] as attention reads it."""
        return self.k[layer], self.v[layer]

    def write(self, k_new: jax.Array, v_new: jax.Array, positions: jax.Array, layer=slice(None)) -> "KVCache":
        """k_new, v_new [L,B,T,K,H] of every layer (or [B,T,K,H] of layer `layer`, an index): step t of row b
        goes to slot positions[b, t]."""
        rows = jnp.arange(positions.shape[0])[:, None]
        return KVCache(self.k.at[layer, rows, positions].set(k_new.astype(self.k.dtype)),
                       self.v.at[layer, rows, positions].set(v_new.astype(self.v.dtype)))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class PoolSharding:
    """The pool's NamedSharding where it spans a mesh, as static data (no pytree leaves: a PagedKV carrying it can
    go through jax.tree functions, a checkpoint or a scan as arrays only)."""

    sharding: Any


class PagedKV(NamedTuple):
    """A KV cache in pages that rows share (the sampler's): a row's context is the pages its table lists, so rows
    of very different lengths share one pool sized by a budget, not rows x longest row, and the samples of one
    prompt can list the same pages for its full prompt pages (copy-on-write: each sample's first page that decode
    writes into is its own).

    k, v [L,n,Pn,page,K,H]: the pool, n = the batch shards (a shard's pages live on the devices of its rows, so
    gathering a row's pages never crosses devices); table [B,W] int32: row b (on shard b // (B / n)) keeps
    positions [j*page, (j+1)*page) in page table[b, j] of its shard. Context slot s of a row is position s, as in
    KVCache. Page 0 of every shard is handed to no row: rows that must not write anywhere (idle, finished) point
    their tables at it.

    Attention reads a row's pages gathered into [B, W*page, K, H] per layer (the einsum reference: it reads
    every page its table lists, or `read_table` where given, W of them for every row; the paged kernel reads only
    each row's own)."""

    k: jax.Array
    v: jax.Array
    table: jax.Array
    sharding: PoolSharding | None = None  # where the pool spans a mesh (the paged kernel then runs per shard)
    # [B]: a row's positions before this one are read, never written (their writes go to the scratch page): a
    # chunk that recomputes a position of a page it shares with others (to score the token after it)
    write_from: jax.Array | None = None
    # [B,Wr]: the pages attention reads (default: table), where they are fewer than those written: a prompt's
    # chunk attends over the pages before it only (its own keys come separately), not over the slots it writes
    read_table: jax.Array | None = None

    @property
    def slots(self) -> int:
        """Context slots attention reads per row."""
        return self._read().shape[1] * self.k.shape[3]

    def _read(self) -> jax.Array:
        return self.table if self.read_table is None else self.read_table

    def _by_shard(self, x: jax.Array) -> jax.Array:  # [B, ...] -> [n, B/n, ...]
        n = self.k.shape[1]
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    def _shard(self) -> jax.Array:  # [n,1,1]: each row's shard, an iota (XLA sees the index as a parallel dim)
        return jnp.arange(self.k.shape[1])[:, None, None]

    def context(self, layer: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Layer `layer`'s pages of each row in order, [B, W*page, K, H]: a gather from the whole pool (slicing
        the layer out first would copy the layer's whole pool per step)."""
        table = self._by_shard(self._read())  # [n, B/n, W]
        B = self.table.shape[0]
        gather = lambda pool: pool[layer, self._shard(), table].reshape(B, -1, *pool.shape[-2:])  # noqa: E731
        return gather(self.k), gather(self.v)

    def layer_view(self, layer: jax.Array, interpret: bool) -> "PagedLayer":
        """Layer `layer` as the paged kernel reads it: the pools whole, nothing gathered."""
        return PagedLayer(self.k, self.v, layer, self.table, interpret, self.sharding)

    def write(self, k_new: jax.Array, v_new: jax.Array, positions: jax.Array, layer=slice(None)) -> "PagedKV":
        """k_new, v_new [L,B,T,K,H] of every layer (or [B,T,K,H] of layer `layer`, an index): step t of row b
        goes to its page for positions[b, t]."""
        page = self.k.shape[3]
        pages = jnp.take_along_axis(self.table, positions // page, axis=1)  # [B, T]
        if self.write_from is not None:
            pages = jnp.where(positions < self.write_from[:, None], 0, pages)
        pages = self._by_shard(pages)  # [n, B/n, T]
        offsets = self._by_shard(positions % page)

        def put(pool, new):  # pool [L,n,Pn,page,K,H], new [(L,)B,T,K,H] -> [(L,)n,B/n,T,K,H] into place
            new = new.reshape(*new.shape[:-4], pool.shape[1], -1, *new.shape[-3:]).astype(pool.dtype)
            pool = pool.at[layer, self._shard(), pages, offsets].set(new)
            # Pinned where the pool spans a mesh: a written pool left free took the new keys' sharding (split over
            # tensor mid-head where the pool keeps its kv heads whole) and was gathered back, whole, per layer.
            return pool if self.sharding is None else jax.lax.with_sharding_constraint(pool, self.sharding.sharding)

        return PagedKV(put(self.k, k_new), put(self.v, v_new), self.table, self.sharding, self.write_from,
                       self.read_table)


class PagedLayer(NamedTuple):
    """One layer of a PagedKV for a decode step's paged kernel (models.paged_attention): the pools k, v
    [L,n,Pn,page,K,H] whole, the layer's index, the rows' page tables [B,W]; `interpret` (static): run the kernel
    in Pallas' interpreter (where it does not lower); `sharding` (static): the pool's, where it spans a mesh."""

    k: jax.Array
    v: jax.Array
    layer: jax.Array
    table: jax.Array
    interpret: bool
    sharding: PoolSharding | None = None


def layer_context(cache: "KVCache | PagedKV", layer: jax.Array, kernel: bool, interpret: bool):
    """What layer `layer`'s attention reads of a decode cache: the pools whole for the paged kernel (`kernel`:
    PagedKV.layer_view), else its context gathered [B,S,K,H] (`context`)."""
    return cache.layer_view(layer, interpret) if kernel else cache.context(layer)


class LayerCache(NamedTuple):
    """A layer's turn at the whole decode cache in an unrolled layer loop (`Decoder(unroll=True)`): its attention
    writes this step's keys and values into `cache` first, then reads its context from the cache it wrote, and
    returns that cache for the next layer. Why write first: unrolled, the layers' reads of the cache and a write
    after them are not ordered by any data dependence (the new keys do not depend on the last layer's attention),
    so XLA copied the whole cache, twice per step, to keep the readers safe; written first, each layer's read
    depends on its write and the next layer's write on that read, a chain XLA updates in place. The context mask
    still excludes the step's own slot, so the arithmetic is the same as reading before the write."""

    cache: "KVCache | PagedKV"
    layer: jax.Array
    kernel: bool  # read through the paged kernel (PagedKV.layer_view) instead of gathering (context)
    interpret: bool  # the kernel in Pallas' interpreter


def probe_attention(impl: str, n_heads: int, n_kv_heads: int, head_dim: int, backward: bool = True) -> str | None:
    """Compile and run `impl` forward and (training's case) backward on a small bf16 input with this head layout.
    -> None if it works, else why not (e.g. no cuDNN, or a cuDNN without this head configuration)."""
    try:
        q = jax.random.normal(jax.random.key(0), (1, 128, n_heads, head_dim), jnp.bfloat16)
        kv = jax.random.normal(jax.random.key(1), (1, 128, n_kv_heads, head_dim), jnp.bfloat16)
        f = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
            q, k, v, is_causal=True, implementation=impl).astype(jnp.float32).sum()
        grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)) if backward else lambda *a: (f(*a),))(q, kv, kv)
        if not all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in grads):
            return "non-finite outputs"
        return None
    except Exception as e:  # noqa: BLE001 - any failure means: do not use this kernel
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


class StaticGraph:
    """An nnx GraphDef as a static jit argument whose hash is computed once. jit hashes static arguments on every
    call, and a Decoder's GraphDef hashes its whole structure (a measurable share of a small step's host time);
    equality falls back to the GraphDefs' own, so equal models still share compiled programs."""

    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value = value.value if isinstance(value, StaticGraph) else value
        self._hash = hash(self.value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticGraph) and (self.value is other.value or self.value == other.value)


def merge(graphdef, *states) -> "Decoder":
    """nnx.merge for a GraphDef or a StaticGraph."""
    return nnx.merge(graphdef.value if isinstance(graphdef, StaticGraph) else graphdef, *states)


# ----------------------------------------------------------------------------------------------- layers


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ LoRA). kernel is [in, out] (HF stores [out, in]); `name` is the projection's name
    in models.lora.PROJECTIONS (q, k, v, o, gate, up, down, unembed), which is how adapters find it."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], name: str, *, rngs: nnx.Rngs,
                 bias: bool = False, param_dtype=jnp.float32):
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), param_dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype), axes=axes[1:]) if bias else None
        self.scale = None  # [out] per-channel scale of an int8 kernel (models.quant; the sampler's weights only)
        self.name = name

    def __call__(self, x: jax.Array, lora: tuple[LoraRows, ...] = ()) -> jax.Array:
        """x [B,T,in] -> [B,T,out]."""
        B, T, d_in = x.shape
        # [B,T,in] -> [M,in]: XLA:CPU's backward of the 3-D form ran ~2x slower
        y = x.reshape(B * T, d_in) @ self.kernel[...].astype(x.dtype)
        if self.scale is not None:  # int8 kernel: x @ (kernel * scale), the scale being per output column
            y = y * self.scale[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return lora_math.apply(y.reshape(B, T, -1), x, lora, self.name)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axes: tuple[str], param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Upcast to fp32 as transformers does: bf16 variance is too coarse and drifts from the reference.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """[H/2] inverse frequencies, with Llama 3 scaling when configured (as transformers computes them)."""
    H = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.int64).astype(np.float32) / H))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wl, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x [B,T,*,H] rotated by positions [B,T] (rotate-half convention, as HF)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B,T,H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B,T,1,H]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.q = Linear(D, N * H, ("embed", "heads"), "q", bias=cfg.qkv_bias, **kw)
        self.k = Linear(D, K * H, ("embed", "kv_heads"), "k", bias=cfg.qkv_bias, **kw)
        self.v = Linear(D, K * H, ("embed", "kv_heads"), "v", bias=cfg.qkv_bias, **kw)
        self.o = Linear(N * H, D, ("heads", "embed"), "o", **kw)
        self.q_norm = RMSNorm(H, cfg.norm_eps, ("head_dim",), param_dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(H, cfg.norm_eps, ("head_dim",), param_dtype) if cfg.qk_norm else None
        self.shape = (N, K, H)

    def __call__(self, x, positions, mask, inv_freq, cache=None, attention="einsum", lora=()):
        """x [B,T,D], positions [B,T] -> (out [B,T,D], (k, v) [B,T,K,H] of this step). `lora`: adapters per rank.

        No cache: `mask` [B,T,T] is the full attention mask over this chunk, applied by the einsum path.
        `attention` "cudnn" or "xla" instead runs jax.nn.dot_product_attention with a plain causal mask (cuDNN's
        fused flash attention on a GPU: the [B,N,T,T] scores never reach memory). That is exact for the rows that
        batching builds, one sequence each, right-padded: causality alone keeps every real query off the pads
        after it; only the pad queries, whose outputs no loss reads, see other keys than with `mask`.
        With cache = (k_cache, v_cache) [B,S,K,H] of this layer, *read only*: queries attend to the cache
        slots where `mask` [B,T,S] is true (the context before this chunk) and, causally, to this chunk's own
        keys. The caller writes the returned k/v into the cache once for all layers: writing inside the layer
        loop made XLA copy the whole cache per layer, which dominated decode time. `attention` "reduce" with a
        cache and T == 1 (a decode step) computes the same attention without dots (`_decode_attention_reduce`).
        With cache = a PagedLayer (a decode step, T == 1), the paged kernel reads the rows' pages in place.
        With cache = a LayerCache (an unrolled decode step), this layer writes its k/v into the whole cache first,
        reads its context from that, and returns the written cache in place of (k, v).
        """
        N, K, H = self.shape
        B, T, _ = x.shape
        q = self.q(x, lora).reshape(B, T, N, H)
        k = self.k(x, lora).reshape(B, T, K, H)
        v = self.v(x, lora).reshape(B, T, K, H)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache is None and attention != "einsum":
            out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(H), is_causal=True,
                                               implementation=attention)  # [B,T,N,H]; GQA handled inside
            return self.o(out.reshape(B, T, N * H), lora), (k, v)
        qg = q.reshape(B, T, K, N // K, H) * (1.0 / math.sqrt(H))  # GQA: G query heads share one kv head
        kv = (k, v)
        if isinstance(cache, LayerCache):  # write first, then read what was written (see LayerCache)
            kv = cache.cache.write(k, v, positions, layer=cache.layer)
            cache = layer_context(kv, cache.layer, cache.kernel, cache.interpret)
        if isinstance(cache, PagedLayer):  # a decode step (T == 1) reading the rows' pages in place
            args = (qg[:, 0], k[:, 0], v[:, 0], cache.k, cache.v, cache.layer, cache.table, positions[:, 0])
            out = paged_decode_attention(*args, interpret=cache.interpret) if cache.sharding is None else \
                sharded_paged_decode_attention(*args, interpret=cache.interpret,
                                               pool_sharding=cache.sharding.sharding)
            return self.o(out.astype(x.dtype).reshape(B, T, N * H), lora), kv
        if cache is not None and attention == "reduce" and T == 1:
            return self.o(_decode_attention_reduce(qg[:, 0], k[:, 0], v[:, 0], *cache, mask[:, 0]).astype(x.dtype)
                          .reshape(B, T, N * H), lora), kv
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k)  # this chunk's own keys
        if cache is not None:  # prepend the cached context's scores; the cache itself is never copied
            ck, cv = cache
            causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
            mask = jnp.concatenate([mask, causal], axis=-1)  # [B,T,S+T]
            scores = jnp.concatenate([jnp.einsum("BTKGH,BSKH->BKGTS", qg, ck.astype(x.dtype)), scores], axis=-1)
        scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        if cache is None:
            out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
        else:
            S = ck.shape[1]
            out = (jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., :S], cv.astype(x.dtype))
                   + jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., S:], v))
        out = out.reshape(B, T, N * H)
        return self.o(out, lora), kv


def _decode_attention_reduce(qg, k, v, ck, cv, mask):
    """One query per row against its context and its own key, as products summed in fp32 (no dot): qg [B,K,G,H]
    (scaled), k, v [B,K,H] this step's, ck, cv [B,S,K,H] the context, mask [B,S] -> [B,K,G,H] fp32. Equal to the
    einsum path up to summation order. The einsum path gathers and transposes the context per layer into the
    layout its batched dots need (15% of a batch-64 decode step on the 2-core CPU, in a profile); here XLA:CPU
    gathers the pages without the transpose and fuses the products into the reductions (x1.13 at batch 64,
    benchmarks/RESULTS.md), which is why "reduce" is the default on CPUs."""
    f32 = jnp.float32
    q32 = qg.astype(f32)
    ctx = jnp.sum(q32[:, None] * ck.astype(f32)[:, :, :, None, :], axis=-1)  # [B,S,K,G]
    ctx = jnp.where(mask[:, :, None, None], ctx, NEG_INF)
    own = jnp.sum(q32 * k.astype(f32)[:, :, None, :], axis=-1)  # [B,K,G]
    top = jnp.maximum(jnp.max(ctx, axis=1), own)  # softmax over the S context slots and the row's own key
    p_ctx, p_own = jnp.exp(ctx - top[:, None]), jnp.exp(own - top)
    denom = jnp.sum(p_ctx, axis=1) + p_own
    out = jnp.sum(p_ctx[..., None] * cv.astype(f32)[:, :, :, None, :], axis=1) + p_own[..., None] * \
        v.astype(f32)[:, :, None, :]
    return out / denom[..., None]


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
        D, F = cfg.d_model, cfg.d_ff
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.gate = Linear(D, F, ("embed", "mlp"), "gate", **kw)
        self.up = Linear(D, F, ("embed", "mlp"), "up", **kw)
        self.down = Linear(F, D, ("mlp", "embed"), "down", **kw)

    def __call__(self, x, lora=()):
        return self.down(jax.nn.silu(self.gate(x, lora)) * self.up(x, lora), lora)  # SwiGLU


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype, moe_impl: str = "auto", moe: bool = True):
        """moe: a mixture-of-experts feed-forward when the config has experts (False: a MoE model's dense layer)."""
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, ("embed",), param_dtype)
        self.attn = Attention(cfg, rngs=rngs, param_dtype=param_dtype)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, ("embed",), param_dtype)
        if cfg.is_moe and moe:
            self.mlp = MoeMLP(cfg.d_model, cfg.d_expert, cfg.n_experts, cfg.n_experts_per_tok, cfg.norm_topk_prob,
                              rngs=rngs, param_dtype=param_dtype, impl=moe_impl)
        else:
            self.mlp = MLP(cfg, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x, positions, mask, inv_freq, cache=None, attention="einsum", lora=(), router=False):
        """-> (x, kv), or with `router` (MoE blocks) (x, kv, router logits [B*T,E] fp32)."""
        h, kv = self.attn(self.attn_norm(x), positions, mask, inv_freq, cache, attention, lora)
        x = x + h
        if router:
            y, logits = self.mlp.forward(self.mlp_norm(x), lora)
            return x + y, kv, logits
        return x + self.mlp(self.mlp_norm(x), lora), kv


# ---------------------------------------------------------------------------------------------- decoder


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, param_dtype, moe_impl: str, stack: str = "blocks") -> Block:
    """The Block of one stack (ModelConfig.stack_layers) with a leading [layers of the stack] axis on every variable
    (one independent init per layer)."""
    keys = jax.random.split(rngs.params(), len(cfg.stack_layers(stack)))
    kw = dict(param_dtype=param_dtype, moe_impl=moe_impl, moe=stack == "blocks")

    def make(key):
        return nnx.split(Block(cfg, rngs=nnx.Rngs(params=key), **kw))[1]

    state = jax.vmap(make)(keys)
    graphdef = nnx.eval_shape(lambda: nnx.split(Block(cfg, rngs=nnx.Rngs(params=0), **kw))[0])
    return nnx.merge(graphdef, state)


def layer_groups(cfg: ModelConfig, max_period: int = 8) -> tuple[tuple[int, tuple[str, ...], int], ...]:
    """The layers as runs of a repeating unit: (first layer, unit (the stack of each of its layers), repeats).
    Each run is one `lax.scan` whose body holds its unit's layers, so compile time follows the summed unit lengths,
    and that is what this minimises (then the number of runs): a uniform model is one run of a one-layer unit,
    decoder_sparse_step 2 one run of (dense, MoE), a few leading dense layers two runs of one-layer units."""
    kinds = cfg.layer_stacks()
    L = len(kinds)
    best: list = [None] * L + [((0, 0), ())]  # best[i]: ((summed unit lengths, runs), runs) for layers i..L-1
    for i in range(L - 1, -1, -1):
        for p in range(1, min(max_period, L - i) + 1):
            unit, n = kinds[i:i + p], 1
            while True:
                (cost, runs), rest = best[i + n * p]
                cand = ((cost + p, runs + 1), ((i, unit, n),) + rest)
                if best[i] is None or cand[0] < best[i][0]:
                    best[i] = cand
                if kinds[i + n * p:i + (n + 1) * p] != unit:
                    break
                n += 1
    return best[0][1]


def scan_layers(cfg: ModelConfig, fn, carry, per_stack: dict, per_layer, unroll: bool = False, remat: bool = False):
    """Every layer in order: carry, y = fn(carry, stack, xs, layer_xs) with `xs` the layer's slice of
    per_stack[stack] (leaves [layers of the stack, ...]) and `layer_xs` its slice of `per_layer` (leaves [L, ...]).
    -> (carry, ys stacked [L, ...] in layer order, or None when fn returns None).

    remat: each scan step (one unit of layers) recomputed in the backward pass, keeping only its matmul outputs.
    The checkpoint wraps the whole step, not each layer: a layer's slice of the step's inputs taken inside a
    checkpoint is recomputed; taken outside, it would be saved, a copy of every layer's weights."""
    seen = dict.fromkeys(per_stack, 0)  # layers of each stack before the run
    ys = []
    for start, unit, n in layer_groups(cfg):
        counts = {s: unit.count(s) for s in dict.fromkeys(unit)}
        sx = {s: jax.tree.map(lambda a, s=s, c=c: _units(a, seen[s], n, c), per_stack[s]) for s, c in counts.items()}
        lx = jax.tree.map(lambda a: _units(a, start, n, len(unit)), per_layer)

        def body(carry, xs, unit=unit, counts=counts):
            sx, lx = xs
            taken, out = dict.fromkeys(sx, 0), []
            for j, s in enumerate(unit):
                one = sx[s] if counts[s] == 1 else jax.tree.map(lambda a, k=taken[s]: a[k], sx[s])
                taken[s] += 1
                carry, y = fn(carry, s, one, lx if len(unit) == 1 else jax.tree.map(lambda a, j=j: a[j], lx))
                out.append(y)
            if out[0] is None or len(unit) == 1:
                return carry, out[0]
            return carry, jax.tree.map(lambda *a: jnp.stack(a), *out)  # [p, ...]

        if remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        carry, y = jax.lax.scan(body, carry, (sx, lx), unroll=unroll)
        if y is not None and len(unit) > 1:
            y = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), y)  # [n, p, ...] -> [n*p, ...]
        ys.append(y)
        for s, c in counts.items():
            seen[s] += n * c
    if ys[0] is None:
        return carry, None
    return carry, ys[0] if len(ys) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *ys)


def _units(a: jax.Array, start: int, n: int, c: int) -> jax.Array:
    """Layers [start, start + n*c) of a stacked leaf as [n, c, ...], or [n, ...] when c is 1 (then, for the whole
    leaf, the leaf itself: a uniform model's scan sees its weights exactly as stored)."""
    if not (start == 0 and n * c == a.shape[0]):
        a = a[start:start + n * c]
    return a if c == 1 else a.reshape(n, c, *a.shape[1:])


class Decoder(nnx.Module):
    """The base model: every weight is an nnx.Param. Adapters are not part of it; they enter each call as
    `lora` (models.lora.LoraRows per rank), so one decoder serves any number of runs. `moe_impl`: the grouped matmul
    of MoE layers (models.grouped: "auto", "ragged" or "blocked"; the engine picks "ragged" when an expert mesh axis
    splits the experts)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32,
                 moe_impl: str = "auto"):
        self.cfg = cfg
        self.dtype = dtype  # compute dtype
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.d_model), param_dtype),
                               axes=("vocab", "embed"))
        self.blocks = _stacked_blocks(cfg, rngs, param_dtype, moe_impl)
        # A MoE model's dense layers: a second stack, interleaved with `blocks` in layer order (layer_groups).
        self.dense_blocks = _stacked_blocks(cfg, rngs, param_dtype, moe_impl, "dense_blocks") \
            if cfg.dense_layers else None
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, ("embed",), param_dtype)
        # Tied models unembed with the embedding matrix (see `logits`).
        self.lm_head = None if cfg.tie_embeddings else Linear(
            cfg.d_model, cfg.vocab_size, ("embed", "vocab"), "unembed", rngs=rngs, param_dtype=param_dtype)

    def __call__(self, tokens, positions, segment_ids=None, cache: KVCache | PagedKV | None = None, remat: bool = False,
                 attention: str = "einsum", unroll: bool = False, lora: tuple[LoraRows, ...] = (),
                 router_stats: bool = False, kv_out: bool = False):
        """tokens, positions [B,T] int32 -> hidden [B,T,D] (final-normed), cache.

        kv_out (no cache): instead of the cache, every layer's keys and values (k, v) [L,B,T,K,H] (a prefill's
        cache, computed without attending over an empty one).

        router_stats (no cache, MoE models): instead of the cache, each row's router statistics summed over its real
        tokens and every layer, [B,2,E] fp32: top-k assignments per expert, then routing probability mass per
        expert (what the load-balancing loss is made of: models.moe.balance_from_stats).

        lora: adapters per rank and the rows that use them (their per-layer weights are scanned with the layers).

        attention, no cache: "einsum" (masks from segment_ids; exact reference, packing-capable), or
        "cudnn" / "xla" (jax.nn.dot_product_attention, causal only: each row must hold one right-padded
        sequence, as batching builds them). See Attention.__call__. With a cache (DECODE_ATTENTION): "einsum", or
        for one-token steps "reduce" (`_decode_attention_reduce`) or, with a PagedKV, "paged" (the rows' pages read
        in place by a Pallas kernel, models.paged_attention; PAGED_INTERPRET: the same in Pallas' interpreter);
        longer chunks always take the einsum path.
        unroll (cache, T == 1 only: a decode step): unroll the layer loop (a decode step is small; a loop costs
            per-iteration overhead); each layer then writes the cache before reading it (LayerCache), where the
            loop writes once after. (A longer chunk would see its own padding's writes; it takes the loop.)

        remat: recompute each layer's activations in the backward pass, keeping only its matmul outputs
        (attention scores, [B,N,T,T] per layer, are the first thing that runs a long-sequence GPU step out
        of memory).
        """
        B, T = tokens.shape
        x = self.embed[...][tokens].astype(self.dtype)
        if cache is None:
            seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids
            idx = jnp.arange(T)
            causal = idx[:, None] >= idx[None, :]  # [T,S]: packed segments are contiguous
            mask = causal[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
        else:
            # The chunk's positions are consecutive per row (prefill: a prompt; decode: T = 1), so the
            # context is every slot before the chunk's first position; later slots may hold stale rows.
            slots = jnp.arange(cache.slots)
            mask = jnp.broadcast_to(slots[None, None, :] < positions[:, :1, None], (B, T, cache.slots))
        stacks = {name: nnx.split(getattr(self, name)) for name in STACKS if getattr(self, name) is not None}
        inv_freq = rope_inv_freq(self.cfg)  # numpy at trace time: a compile-time constant

        allowed = ATTENTION_IMPLS if cache is None else (*DECODE_ATTENTION, PAGED_INTERPRET)
        if attention not in allowed:
            raise ValueError(f"attention: expected one of {allowed}, got {attention!r}")
        lora = tuple(lora)
        # per stack: (its layers' weights, each rank's adapter weights [layers,S,...]), sliced per layer by the scan
        per_stack = {name: (state, tuple(c.per_layer(name) for c in lora)) for name, (_, state) in stacks.items()}

        def block_of(name, layer_state, lw):
            return nnx.merge(stacks[name][0], layer_state), tuple(c.with_weights(w) for c, w in zip(lora, lw))

        if cache is None:
            stats = router_stats and self.cfg.is_moe
            real = (seg != 0).astype(jnp.float32)  # [B,T]

            def layer(carry, name, xs, _):
                h, acc = carry  # acc: the router statistics so far ([B,2,E]; a placeholder without `stats`)
                block, lw = block_of(name, *xs)
                if not (stats and name == "blocks"):
                    h, kv = block(h, positions, mask, inv_freq, None, attention, lw)
                    return (h, acc), kv if kv_out else None
                h, _, logits = block(h, positions, mask, inv_freq, None, attention, lw, router=True)
                logits = jax.lax.stop_gradient(logits.reshape(B, T, -1))  # a metric: nothing to differentiate
                return (h, acc + row_router_stats(logits, real, self.cfg.n_experts_per_tok)), None

            if kv_out and stats:
                raise ValueError("kv_out and router_stats: one or the other")
            acc = jnp.zeros((B, 2, self.cfg.n_experts) if stats else (), jnp.float32)
            (x, acc), kv = scan_layers(self.cfg, layer, (x, acc), per_stack, (), remat=remat)
            return self.final_norm(x), kv if kv_out else acc if stats else None

        paged = attention in ("paged", PAGED_INTERPRET) and T == 1 and isinstance(cache, PagedKV)

        if unroll and T == 1:  # each layer writes the cache, then reads it (see LayerCache); the cache is the carry
            def unrolled_layer(carry, name, xs, layer):
                h, c = carry
                block, lw = block_of(name, *xs)
                turn = LayerCache(c, layer, paged, attention == PAGED_INTERPRET)
                return block(h, positions, mask, inv_freq, turn, attention, lora=lw), None

            (x, cache), _ = scan_layers(self.cfg, unrolled_layer, (x, cache), per_stack,
                                        jnp.arange(self.cfg.n_layers), unroll=True)
            return self.final_norm(x), cache

        def cached_layer(h, name, xs, layer):
            block, lw = block_of(name, *xs)
            ctx = layer_context(cache, layer, paged, attention == PAGED_INTERPRET)
            return block(h, positions, mask, inv_freq, ctx, attention, lora=lw)

        # The cache is read whole by each layer's context (a layer index, not a slice: see PagedKV.context), and
        # written once after the loop: the loop's reads then all come before the write, and XLA writes in place.
        x, (k_new, v_new) = scan_layers(self.cfg, cached_layer, x, per_stack, jnp.arange(self.cfg.n_layers))
        return self.final_norm(x), cache.write(k_new, v_new, positions)  # new: [L,B,T,K,H]

    def logits(self, hidden: jax.Array, lora: tuple[LoraRows, ...] = ()) -> jax.Array:
        """hidden [B,T,D] -> logits [B,T,V] float32. A tied model's unembedding is the embedding matrix; an
        adapter on `unembed` adds to the logits either way and never touches the input embedding."""
        if self.lm_head is not None:
            return self.lm_head(hidden, lora).astype(jnp.float32)
        B, T, D = hidden.shape
        y = (hidden.reshape(B * T, D) @ self.embed[...].astype(hidden.dtype).T).reshape(B, T, -1)
        return lora_math.apply(y, hidden, lora, "unembed").astype(jnp.float32)
