"""The JAX sampler over a device mesh (the 8 virtual CPU devices from conftest.py) samples what it samples on one
device: greedy and seeded tokens identical, sampled and prompt logprobs within 1e-5 (fp32), with a LoRA adapter's
rows decoding in the same calls as base rows; and its KV cache, adapter table and outputs are placed as the
training rule table says (the test fails if the cache silently stays on one device).

One workload per mesh, shaped so that every mesh compiles the same few programs (one prefill per adapter rank, one
insert, one decode): 4 rows of a 16-row cache, so decode calls run on the first rows of each batch shard only (the
per-shard row bucket), one request's 2 samples land on different shards (insertion across shards), and no row stops
early (stop=[]: every row finishes in the same call). The kernels compile with XLA's CPU optimisation off
(models_util.FAST_XLA, reference and meshes alike): an 8-device decode program compiles in ~1 s instead of ~7 s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tinker import types

import models_util as mu
from tinker_jax.hf.weights import load_decoder
from tinker_jax.models import lora as lora_math
from tinker_jax.models.lora import Adapter, LoraSpec
from tinker_jax.models.sharding import MeshConfig, make_mesh, state_shardings
from tinker_jax.sampling import Sampler, WeightSnapshot, kernels, snapshot_of

PRESET = "tiny-qwen3"  # tied embeddings (vocab-sharded unembedding), q/k norms; 2 kv heads
ROWS = 16
RANK = 4
TOL = 1e-5

# mesh -> (expected KV pool spec [L,n,Pn,page,K,H], devices it spans). Pages go over data x fsdp with their rows
# (n = the batch shards); the 2 kv heads over tensor only where tensor divides them (tensor=4 does not: replicated,
# spec_for's rule).
MESHES = {
    "tp4": (MeshConfig(tensor=4), P(), 4),
    "fsdp2xtp4": (MeshConfig(fsdp=2, tensor=4), P(None, "fsdp"), 8),
    "dp2xtp2": (MeshConfig(data=2, tensor=2), P(None, "data", None, None, "tensor"), 4),
    # Rows over two mesh axes at once: a shard's index runs data-major (rows and their pages must agree on it).
    "dp2xfsdp2xtp2": (MeshConfig(data=2, fsdp=2, tensor=2), P(None, ("data", "fsdp"), None, None, "tensor"), 8),
}


def _sampler(mesh, max_batch=ROWS, prefill_chunk=None, decode_attention="auto", decode_unroll=False) -> Sampler:
    s = Sampler(mu.jax_model(PRESET).cfg, max_batch=max_batch, max_seq_len=32, prefill_lengths=(8,),
                prefill_batches=(1, 2, 4), prefill_chunk=prefill_chunk, decode_steps=4, decode_lengths=(16,),
                max_topk_prompt_logprobs=3, mesh=mesh, compiler_options=mu._compiler_options(),
                decode_attention=decode_attention, decode_unroll=decode_unroll,
                page_size=4)  # small pages, so that prompts of 6 and 7 tokens fill some (shared, cached)
    return s.drive(lambda: None)  # this thread steps it: rows submitted together start in the same step


def _adapter(seed: int) -> Adapter:
    spec = LoraSpec(rank=RANK)  # every projection, unembed included (its `b` is vocab-sharded on tensor meshes)
    rng = np.random.default_rng(seed)
    shapes = lora_math.targeted(lora_math.shapes(mu.jax_model(PRESET).cfg, RANK), spec)
    return Adapter(spec, {n: {k: jnp.asarray(rng.normal(0, 0.05, sh), jnp.float32) for k, sh in w.items()}
                          for n, w in shapes.items()})


def _workload(sampler: Sampler, base: WeightSnapshot, lora: WeightSnapshot, seed: int = 0):
    """Submit everything, then step until done -> the responses (seeded sampling, greedy, LoRA, prompt logprobs)."""
    prompt = lambda i, n: np.random.default_rng(seed * 10 + i).integers(3, 500, n).tolist()  # noqa: E731
    futs = [
        sampler.submit(base, prompt(0, 6), types.SamplingParams(max_tokens=5, temperature=0.8, seed=5 + seed,
                                                                stop=[]), num_samples=2),
        sampler.submit(base, prompt(1, 7), types.SamplingParams(max_tokens=5, temperature=0.0, stop=[]),
                       include_prompt_logprobs=True, topk_prompt_logprobs=3),
        sampler.submit(lora, prompt(1, 7), types.SamplingParams(max_tokens=5, temperature=0.0, stop=[]),
                       include_prompt_logprobs=True),
    ]
    while sampler.has_work():
        sampler.step()
    return [f.result(timeout=0) for f in futs]


def _snapshots(mesh, adapter_seed: int = 0):
    sh = None if mesh is None else (lambda st: state_shardings(st, mesh))
    base = snapshot_of(load_decoder(mu.tiny_model_dir(PRESET), shardings_fn=sh), name="base")
    lora = WeightSnapshot(base.cfg, base.graphdef, base.params, _adapter(adapter_seed), name="lora")
    return base, lora


def _assert_same(got, want):
    for g, w in zip(got, want):
        assert len(g.sequences) == len(w.sequences)
        for gs, ws in zip(g.sequences, w.sequences):
            assert gs.tokens == ws.tokens
            np.testing.assert_allclose(gs.logprobs, ws.logprobs, rtol=0, atol=TOL)
        if w.prompt_logprobs is not None:
            assert g.prompt_logprobs[0] is None
            np.testing.assert_allclose(g.prompt_logprobs[1:], w.prompt_logprobs[1:], rtol=0, atol=TOL)
        if w.topk_prompt_logprobs is not None:
            for gk, wk in zip(g.topk_prompt_logprobs[1:], w.topk_prompt_logprobs[1:]):
                assert [t for t, _ in gk] == [t for t, _ in wk]
                np.testing.assert_allclose([v for _, v in gk], [v for _, v in wk], rtol=0, atol=TOL)


@pytest.fixture(scope="module")
def reference():
    """The single-device result (mesh=None: one device, the behaviour without a mesh)."""
    s = _sampler(None)
    out = _workload(s, *_snapshots(None))
    assert s.stats["last_decode_rows"] == 4 < ROWS  # the row bucket, not every row
    assert s.stats["decode_calls"] == 2  # 5 tokens at 4 steps per call: base and LoRA rows in the same calls
    assert len({tuple(x.tokens) for x in out[0].sequences}) == 2  # the two seeded samples differ
    # The adapter really acts: the same prompt scores differently with it (its tokens may still coincide).
    assert np.abs(np.array(out[2].prompt_logprobs[1:]) - np.array(out[1].prompt_logprobs[1:])).max() > 0.1
    return out


@pytest.mark.parametrize("name", list(MESHES))
def test_mesh_samples_like_one_device(name, reference):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, see conftest.py)")
    mc, cache_spec, n_devices = MESHES[name]
    mesh = make_mesh(mc)
    s = _sampler(mesh)
    base, lora = _snapshots(mesh)
    # Placed before any request: zeros created over the mesh, not on one device first.
    for x in s._pool:
        assert x.sharding.spec == cache_spec and len(x.sharding.device_set) == n_devices
    got = _workload(s, base, lora)
    _assert_same(got, reference)
    assert s.stats["decode_calls"] == 2  # 5 tokens at 4 steps per call: base and LoRA rows in the same calls
    # Outputs keep their placement: the cache the decode calls returned is still split as intended.
    for x in s._pool:
        assert x.sharding.mesh == mesh and x.sharding.spec == cache_spec
    # The 4 rows sit round-robin over the shards; a decode call covers the first rows of each shard (a power of 4).
    shards, per = mc.data * mc.fsdp, ROWS // (mc.data * mc.fsdp)
    bucket = next((b for b in (1, 4) if b >= -(-4 // shards) and b < per), per)
    assert s.stats["last_decode_rows"] == bucket * shards < ROWS
    table = s._tables[RANK].weights
    fsdp = "fsdp" if mc.fsdp > 1 else None
    assert table["q"]["a"].sharding.spec == P(*([None, None, fsdp] if fsdp else []))  # [L,S,D,R]: D over fsdp
    assert table["unembed"]["b"].sharding.spec == P(None, None, "tensor")  # [S,R,V]: V over tensor
    if name == "dp2xfsdp2xtp2":
        # Again: the first request's prompt (not scored) is found whole in the prefix cache on one shard and not
        # prefilled; its two samples' rows, on two shards, list or copy its pages. Still the single-device answer.
        _assert_same(_workload(s, base, lora), reference)
        assert s.stats["prompt_cache_hits"] == 1
        # A next turn on the second sample's answer: its first page is cached on the shard where the request's first
        # sample ran, its second (the answer's start) where the second sample ran. The prefill gathers both, runs
        # only the rest, and still samples the single-device answer.
        turn = np.random.default_rng(0).integers(3, 500, 6).tolist() + got[0].sequences[1].tokens + [7, 9]
        params = types.SamplingParams(max_tokens=3, temperature=0.0, stop=[])
        answers = []
        for sampler, snap in ((s, base), (_sampler(None), _snapshots(None)[0])):
            fut = sampler.submit(snap, turn, params)
            while sampler.has_work():
                sampler.step()
            answers.append(fut.result(timeout=0))
        assert answers[0].prompt_cache_hit_tokens == 8 and s.stats["prefix_cache_prefills"] == 1
        _assert_same(answers[:1], answers[1:])
    if name == "dp2xtp2":
        # New values, new adapter, new seeds and prompts: nothing recompiles, and still the single-device answer.
        sizes = [k._cache_size() for k in (kernels.prefill, kernels.decode, kernels.insert_pages, kernels.put_adapter)]
        ref_s = _sampler(None)
        want = _workload(ref_s, *_snapshots(None, adapter_seed=1), seed=1)
        got = _workload(s, base, WeightSnapshot(base.cfg, base.graphdef, base.params, _adapter(1)), seed=1)
        _assert_same(got, want)
        assert [k._cache_size() for k in (kernels.prefill, kernels.decode, kernels.insert_pages,
                                          kernels.put_adapter)] == sizes


def test_max_batch_rounds_up_to_the_batch_shards(caplog):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    with caplog.at_level("WARNING"):
        s = _sampler(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), max_batch=6)
    assert s.max_batch == 8 and s.prefill_batches == (4,)  # (1, 2, 4): each a multiple of the 4 shards
    assert "max_batch 6 rounded up to 8" in caplog.text
    assert s._pool[0].sharding.spec == P(None, ("data", "fsdp"), None, None, "tensor")
    # Free rows go round-robin over the 4 shards (2 rows each): the first rows handed out are on different devices.
    assert s._row_order[:4] == [0, 2, 4, 6]


def test_weights_off_the_mesh_are_refused():
    """A snapshot whose weights are not placed by the mesh rules fails its own request with a clear error (the
    kernels would otherwise refuse them at call time, or move the whole model every call)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    s = _sampler(make_mesh(MeshConfig(tensor=2)))
    base, _ = _snapshots(make_mesh(MeshConfig(fsdp=2)))  # another mesh's placement
    fut = s.submit(base, [5, 6, 7], types.SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="not placed on this sampler's mesh"):
        fut.result(timeout=0)


def test_chunked_prefill_over_a_mesh_equals_a_whole_prefill_on_one_device():
    """A prompt prefilled 4 tokens per step (kernels.prefill_pages) on dp2 x fsdp2 x tp2, rows over two mesh axes,
    samples what one device samples after prefilling the prompt whole: tokens, sampled and prompt logprobs, and
    target_prompt_logprobs; so does a second prompt prefilled with it, its chunks in the same calls from its pages
    on another batch shard; also when its chunks write the pages of another batch shard, and when a longer
    prompt's logprobs start from its cached pages."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, see conftest.py)")
    prompt = np.random.default_rng(7).integers(3, 500, 13).tolist()
    params = types.SamplingParams(max_tokens=5, temperature=0.8, seed=3, stop=[])
    ids = np.random.default_rng(8).integers(0, 500, (12, 2))
    ids[4, 1] = -1
    targets = types.TensorData(data=ids.reshape(-1).tolist(), dtype="int64", shape=[12, 2])  # target_prompt_logprobs
    second = np.random.default_rng(10).integers(3, 500, 11).tolist()
    ids2 = np.random.default_rng(11).integers(0, 500, (10, 2))
    targets2 = types.TensorData(data=ids2.reshape(-1).tolist(), dtype="int64", shape=[10, 2])
    out, out2 = [], []
    for mesh, chunk in ((None, None), (make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), 4)):
        s = _sampler(mesh, prefill_chunk=chunk)
        base, _ = _snapshots(mesh)
        fut = s.submit(base, prompt, params, include_prompt_logprobs=True, target_prompt_logprobs=targets)
        fut2 = s.submit(base, second, params, include_prompt_logprobs=True, target_prompt_logprobs=targets2)
        s.step()
        if chunk:  # the first on batch shard 0 (the most free pages), the second then on shard 1
            assert sorted(job.shard for job in s._prefilling) == [0, 1]
        while s.has_work():
            s.step()
        out.append(fut.result(timeout=0))
        out2.append(fut2.result(timeout=0))
        # 12 prompt positions in chunks of 4: 3 chunks (not the 32-token bucket's 8); the second's 10: 3 more, each
        # beside one of the first's in a call
        assert (s.stats["prefill_chunks"], s.stats["prefill_chunk_calls"]) == ((0, 0) if chunk is None else (6, 3))
    _assert_same(out2[1:], out2[:1])
    # Again with batch shard 0 short of free pages: the chunks write the pages of another shard, from its prefill row.
    pg = s._pages
    held = pg.take(0, pg.free(0) - pg.free(1) + 1)
    fut = s.submit(base, prompt, params, include_prompt_logprobs=True, target_prompt_logprobs=targets)
    s.step()
    assert s._prefilling[0].shard != 0
    while s.has_work():
        s.step()
    pg.drop(0, held)
    _assert_same([out[1], fut.result(timeout=0)], out[:1] * 2)
    got, want = (np.asarray(o.target_prompt_logprobs.data) for o in out[::-1])
    assert np.count_nonzero(want) == 12 * 2 - 1  # every asked cell has a (negative) logprob, the -1 cell 0.0
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    # compute_logprobs of the prompt continued: its 3 full pages come from the cache with their tokens' logprobs
    # (the scored prompt left them), its chunks start at the last cached position without writing it; its prompt
    # logprobs are those of one device's whole prefill.
    longer = prompt + np.random.default_rng(9).integers(3, 500, 6).tolist()
    scored = []
    for sampler, snap in ((s, base), (_sampler(None), _snapshots(None)[0])):
        fut = sampler.submit(snap, longer, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True)
        while sampler.has_work():
            sampler.step()
        scored.append(fut.result(timeout=0))
    assert [r.prompt_cache_hit_tokens for r in scored] == [12, 0]
    np.testing.assert_allclose(scored[0].prompt_logprobs[1:], scored[1].prompt_logprobs[1:], rtol=0, atol=TOL)


@pytest.mark.parametrize("name,unroll", [("dp2xtp2", False), ("tp4", False), ("dp2xtp2", True)])
def test_the_paged_kernel_over_a_mesh_samples_like_one_device(name, unroll, reference):
    """decode_attention "paged" (Pallas' interpreter on this CPU) over a mesh: each device runs the kernel on its
    rows and kv heads against its own pages (a shard_map): rows over data with their pages, kv heads over tensor
    (dp2xtp2), or kept whole where tensor=4 does not divide the 2 kv heads (tp4). Still the single-device answer.
    Also with the layer loop unrolled (decode_unroll), where each layer writes its keys and values into the
    sharded pool before its kernel reads it (decoder.LayerCache)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, see conftest.py)")
    mesh = make_mesh(MESHES[name][0])
    s = _sampler(mesh, decode_attention="paged", decode_unroll=unroll)
    assert s.decode_attention == "paged-interpret"
    _assert_same(_workload(s, *_snapshots(mesh)), reference)
