"""vLLM sampler backend (tinker_jax/sampling/vllm_backend.py).

Two kinds of tests:
- CPU (always run, no vllm needed): the SamplingParams -> vLLM kwargs mapping, the LLM kwargs, the output
  conversion, the config dispatch in factory.py, the export cache keyed by snapshot, and the request
  plumbing against a stand-in `vllm` module (it checks our code, not vLLM's behaviour).
- GPU (class TestOnGPU): vLLM against the JAX sampler. Skipped unless `vllm` imports and a CUDA GPU is
  visible; they have never run (no GPU with vLLM has been available).
"""

from __future__ import annotations

import importlib.util
import gc
import sys
import types as pytypes
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import models_util
import numpy as np
import pytest
from flax import nnx
from tinker import types

from tinker_jax.errors import UserError
from tinker_jax.hf.convert import load_peft_adapter
from tinker_jax.hf.weights import iter_hf_tensors
from tinker_jax.models import lora
from tinker_jax.models.lora import Adapter, LoraSpec
from tinker_jax.sampling import WeightSnapshot, make_sampler, snapshot_of
from tinker_jax.sampling import vllm_backend as vb
from tinker_jax.sampling.params import Limits, validate_request

EOS = (7, 9)
LIMITS = Limits(vocab_size=512, max_seq_len=64, max_num_samples=8, max_topk_prompt_logprobs=5, max_stop_tokens=16,
                has_tokenizer=True)


def spec(prompt=(1, 2, 3), n=1, include=False, topk=0, **kw):
    kw.setdefault("max_tokens", 5)
    return validate_request(list(prompt), types.SamplingParams(**kw), n, include, topk, limits=LIMITS,
                            eos_token_ids=EOS)


# ------------------------------------------------------------------------------------- pure mappings


def test_sampling_kwargs_defaults_keep_eos_as_explicit_stop_ids():
    s = spec(max_tokens=7, temperature=0.7, top_p=0.9, n=3)
    kw = vb.sampling_kwargs(s, seeded=False)
    assert kw == {"n": 3, "max_tokens": 7, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "seed": None,
                  "stop": [], "stop_token_ids": [7, 9], "ignore_eos": True, "include_stop_str_in_output": True,
                  "skip_special_tokens": False, "logprobs": 1, "prompt_logprobs": None}


@pytest.mark.parametrize("stop, ids, strings", [
    (None, [7, 9], []),  # implicit EOS (from the model's config files)
    ([], [], []),  # nothing stops generation before max_tokens
    ([5, 5, 6], [5, 6], []),  # explicit ids replace EOS
    (["ab", "c"], [], ["ab", "c"]),  # strings replace EOS too
    ("x", [], ["x"]),
])
def test_sampling_kwargs_stop_rule_is_the_jax_samplers(stop, ids, strings):
    kw = vb.sampling_kwargs(spec(stop=stop), seeded=False)
    assert (kw["stop_token_ids"], kw["stop"], kw["ignore_eos"]) == (ids, strings, True)


@pytest.mark.parametrize("top_k, want", [(-1, -1), (0, -1), (5, 5), (511, 511), (512, -1), (10_000, -1)])
def test_sampling_kwargs_top_k(top_k, want):
    assert vb.sampling_kwargs(spec(top_k=top_k), seeded=False)["top_k"] == want


def test_sampling_kwargs_seed_and_greedy():
    assert vb.sampling_kwargs(spec(seed=123), seeded=True)["seed"] == 123
    assert vb.sampling_kwargs(spec(seed=2**64 - 1), seeded=True)["seed"] == (2**64 - 1) % 2**63
    assert vb.sampling_kwargs(spec(temperature=0.0), seeded=False)["temperature"] == 0.0


@pytest.mark.parametrize("include, topk, want", [(False, 0, None), (True, 0, 0), (False, 3, 3), (True, 5, 5)])
def test_sampling_kwargs_prompt_logprobs(include, topk, want):
    assert vb.sampling_kwargs(spec(include=include, topk=topk), seeded=False)["prompt_logprobs"] == want


def test_validation_errors_are_the_jax_samplers():
    with pytest.raises(ValueError, match="^max_tokens"):
        spec(max_tokens=None)
    with pytest.raises(ValueError, match="^top_p"):
        spec(top_p=1.5)
    with pytest.raises(ValueError, match="^stop"):
        spec(stop=[512])


def test_lora_rank_bucket_and_llm_kwargs():
    assert [vb.lora_rank_bucket(r) for r in (1, 2, 8, 9, 32, 33, 64, 300, 512)] == [1, 8, 8, 16, 32, 64, 64, 320, 512]
    with pytest.raises(ValueError, match="max_lora_rank"):
        vb.lora_rank_bucket(513)
    kw = vb.llm_kwargs("/m", "/t", SimpleNamespace(max_lora_rank=40, max_topk_prompt_logprobs=30), "bfloat16", 256)
    assert kw["model"] == "/m" and kw["tokenizer"] == "/t" and kw["dtype"] == "bfloat16"
    assert (kw["max_model_len"], kw["max_lora_rank"], kw["max_logprobs"]) == (256, 64, 30)
    assert kw["enable_lora"] and kw["logprobs_mode"] == "processed_logprobs" and kw["generation_config"] == "vllm"
    assert vb.llm_kwargs("/m", "/m", None, "float32", 64)["max_lora_rank"] == 64


def LP(logprob, rank=1):
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=None)


def test_to_sequence():
    out = SimpleNamespace(index=0, token_ids=[4, 9], logprobs=[{4: LP(-0.5), 1: LP(-2.0, 2)}, {9: LP(-0.25)}],
                          finish_reason="length")
    seq = vb.to_sequence(out, (7, 9), "r:0")
    assert (seq.tokens, seq.logprobs, seq.stop_reason, seq.sequence_id) == ([4, 9], [-0.5, -0.25], "stop", "r:0")
    out.token_ids, out.logprobs = [4], out.logprobs[:1]  # max_tokens on a non-stop token
    assert vb.to_sequence(out, (7, 9), "r:0").stop_reason == "length"
    out.finish_reason = "abort"
    with pytest.raises(RuntimeError, match="abort"):
        vb.to_sequence(out, (7, 9), "r:0")


def test_to_prompt_logprobs():
    prompt = [3, 4, 5]
    plps = [None, {4: LP(-1.0, 2), 8: LP(-0.5, 1)}, {5: LP(-3.0, 7), 1: LP(-0.1, 1), 2: LP(-0.2, 2)}]
    lp, topk = vb.to_prompt_logprobs(prompt, plps, 0)
    assert np.isnan(lp[0]) and lp[1:].tolist() == [-1.0, -3.0] and topk is None
    lp, topk = vb.to_prompt_logprobs(prompt, plps, 2)
    assert topk.token_ids.tolist() == [[0, 0], [8, 4], [1, 2]]
    assert np.allclose(topk.logprobs[1:], [[-0.5, -1.0], [-0.1, -0.2]])
    resp = types.SampleResponse(sequences=[], prompt_logprobs_np=lp, topk_prompt_logprobs_np=topk)
    assert resp.prompt_logprobs == [None, -1.0, -3.0]
    assert resp.topk_prompt_logprobs[0] is None
    with pytest.raises(RuntimeError, match="prompt logprobs"):
        vb.to_prompt_logprobs(prompt, plps[:2], 0)


# -------------------------------------------------------------------------------------------- dispatch


@pytest.fixture(autouse=True)
def _vllm_env(monkeypatch):
    """VLLMSampler sets these with os.environ.setdefault; keep them out of the other tests' environment."""
    for name, value in (("VLLM_WORKER_MULTIPROC_METHOD", "spawn"), ("VLLM_USE_FLASHINFER_SAMPLER", "0")):
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def base():
    d = models_util.tiny_model_dir("tiny-qwen3")
    dec = models_util.jax_model("tiny-qwen3")
    return SimpleNamespace(name="tiny", path=d, cfg=dec.cfg, decoder=dec)


def test_factory_vllm_without_vllm_names_the_gpu_extra(base, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(vb.VLLMUnavailable, match=r"pip install 'tinker-jax\[gpu\]'.*`gpu` extra"):
        make_sampler(base, SimpleNamespace(backend="vllm"))


def test_factory_unknown_backend(base):
    with pytest.raises(ValueError, match="^sampler.backend: expected 'jax' or 'vllm', got 'tpu'"):
        make_sampler(base, SimpleNamespace(backend="tpu"))


# ---------------------------------------------------------------------------------------- export cache


NO_UNEMBED = ("attn", "mlp")  # targets vLLM serves as a LoRA (its LoRA does not cover lm_head)


def base_params(dec):
    """The base decoder's params object: what the engine shares between its base and LoRA snapshots."""
    return nnx.state(dec, nnx.Param)


def lora_snapshot(dec, spec: LoraSpec, seed: int):
    """dec's (shared) params plus a random non-zero adapter on spec.targets. The shapes come from a fresh
    `init_adapter` restricted with `lora.targeted`; b is random too, so the adapter is not a no-op."""
    fresh = lora.targeted(lora.init_adapter(dec.cfg, spec), spec)
    rs = np.random.RandomState(seed)
    weights = jax.tree.map(lambda x: jnp.asarray(0.1 * rs.standard_normal(x.shape), jnp.float32), fresh)
    return snapshot_of(dec, adapter=Adapter(spec, weights), params=base_params(dec))


def full_snapshot(dec, delta=0.01):
    """A full fine-tuning snapshot: private params (every base weight + delta), no adapter."""
    s = snapshot_of(dec)
    return WeightSnapshot(s.cfg, s.graphdef, jax.tree.map(lambda x: x + delta, s.params))


def test_base_snapshots_share_the_base_params(base):
    """What the backend's base/LoRA classification relies on: nnx.state of a decoder returns its own arrays."""
    first = jax.tree.leaves(base_params(base.decoder))[0]
    assert jax.tree.leaves(snapshot_of(base.decoder).params)[0] is first
    assert jax.tree.leaves(full_snapshot(base.decoder).params)[0] is not first


def _merged_weights(d):
    from safetensors.numpy import load_file

    return load_file(str(d / "model.safetensors"))  # tiny models: one shard


def test_export_cache_keyed_by_snapshot(base, tmp_path):
    cache = vb.ExportCache(base, tmp_path, max_lora_rank=16)
    assert cache.target(snapshot_of(base.decoder)) == vb.Target("base") and cache.exports == 0
    # A separately built params object (same structure) is not the base's: no adapter -> merged.
    own = snapshot_of(base.decoder, params=jax.tree.map(jnp.copy, base_params(base.decoder)))
    assert cache.target(own).kind == "merged" and cache.exports == 0  # merged exports happen on load

    spec_a = LoraSpec(rank=4, targets=NO_UNEMBED)
    a = lora_snapshot(base.decoder, spec_a, 1)
    ta = cache.target(a)
    assert ta.kind == "lora" and (ta.path / "adapter_config.json").is_file() and cache.exports == 1
    assert cache.target(a) is ta and cache.exports == 1  # cached: no second export
    back = load_peft_adapter(ta.path, base.cfg)  # the export is a.adapter, rank/alpha/targets included
    assert back.spec.rank == 4 and back.spec.alpha == spec_a.alpha and back.spec.targets == spec_a.targets
    for n, w in a.adapter.numpy().items():
        for k, x in w.items():
            np.testing.assert_allclose(np.asarray(back.weights[n][k]), x, rtol=1e-6, atol=1e-7)
    b = lora_snapshot(base.decoder, LoraSpec(rank=4, targets=NO_UNEMBED), 2)
    tb = cache.target(b)
    assert tb.kind == "lora" and tb.path != ta.path and tb.serial != ta.serial and cache.exports == 2

    path = ta.path
    del a
    gc.collect()
    assert not path.exists() and tb.path.exists()  # a collected snapshot's adapter is deleted

    # lm_head adapters (vLLM's LoRA does not cover lm_head) and full fine-tuning: merged weights.
    head = lora_snapshot(base.decoder, LoraSpec(rank=4, targets=("attn", "unembed")), 3)
    th = cache.target(head)
    assert th.kind == "merged" and th.path is None and cache.exports == 2  # no PEFT export for it
    f1, f2 = full_snapshot(base.decoder), full_snapshot(base.decoder, 0.02)
    t1 = cache.target(f1)
    assert t1.kind == "merged" and cache.target(f1) is t1 and cache.target(f2).serial != t1.serial
    d1 = cache.merged_dir(f1)
    assert (d1 / "config.json").is_file() and cache.merged_dir(f1) == d1 and cache.exports == 3
    w1, w0 = _merged_weights(d1), dict(iter_hf_tensors(base.decoder))
    assert set(w1) == set(w0) and all(np.allclose(w1[k], w0[k] + 0.01, atol=1e-6) for k in w0)  # its own params
    d2 = cache.merged_dir(f2)
    assert d2 != d1 and d2.is_dir() and not d1.exists()  # one merged export at a time

    # The lm_head adapter's merged export carries the adapter: an explicit, adapted lm_head (the model is tied).
    dh = cache.merged_dir(head)
    wh = _merged_weights(dh)
    spec, aw = head.adapter.spec, head.adapter.numpy()
    assert "lm_head.weight" in wh and "lm_head.weight" not in w0 and base.cfg.tie_embeddings
    want = w0["model.embed_tokens.weight"] + lora.merged_delta(aw["unembed"]["a"], aw["unembed"]["b"], spec.scale).T
    np.testing.assert_allclose(wh["lm_head.weight"], want, rtol=1e-5, atol=1e-6)
    q0 = w0["model.layers.0.self_attn.q_proj.weight"]
    assert not np.allclose(wh["model.layers.0.self_attn.q_proj.weight"], q0, atol=1e-4)  # attn merged too
    np.testing.assert_array_equal(wh["model.layers.0.mlp.up_proj.weight"], w0["model.layers.0.mlp.up_proj.weight"])
    assert not d2.exists()

    with pytest.raises(UserError, match="^snapshot: LoRA rank 32 exceeds .* max_lora_rank 16"):
        cache.target(lora_snapshot(base.decoder, LoraSpec(rank=32, targets=NO_UNEMBED), 4))
    assert sorted(tmp_path.glob("adapter-*")) == [tb.path]  # only b's adapter is on disk: no export for rank 32


# ------------------------------------------------------------------- plumbing with a stand-in vllm module


class FakeLLM:
    """Records its kwargs and calls; sample i of a request generates prompt[-1] + 1 + i, + 2 + i, ..."""

    def __init__(self, **kw):
        self.kw, self.calls, self.closed = kw, [], False

    def shutdown(self):
        self.closed = True

    def generate(self, prompts, params, use_tqdm, lora_request):
        self.calls.append((prompts, params, lora_request))
        outs = []
        for p, sp in zip(prompts, params):
            toks = p["prompt_token_ids"]
            samples = []
            for i in reversed(range(sp.kw["n"])):  # out of order on purpose
                gen = [toks[-1] + 1 + i + j for j in range(sp.kw["max_tokens"])]
                samples.append(SimpleNamespace(index=i, token_ids=gen, logprobs=[{t: LP(-0.5)} for t in gen],
                                               finish_reason="length"))
            plp = None if sp.kw["prompt_logprobs"] is None else \
                [None] + [{t: LP(-float(j + 1))} for j, t in enumerate(toks[1:])]
            outs.append(SimpleNamespace(outputs=samples, prompt_logprobs=plp))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    llms = []
    mod = pytypes.ModuleType("vllm")
    mod.LLM = lambda **kw: llms.append(FakeLLM(**kw)) or llms[-1]
    mod.SamplingParams = lambda **kw: SimpleNamespace(kw=kw)
    req = pytypes.ModuleType("vllm.lora.request")
    req.LoRARequest = lambda name, id_, path: SimpleNamespace(name=name, id=id_, path=path)
    for name, m in (("vllm", mod), ("vllm.lora", pytypes.ModuleType("vllm.lora")), ("vllm.lora.request", req)):
        monkeypatch.setitem(sys.modules, name, m)
    return llms


def test_plumbing_with_stand_in_vllm(base, fake_vllm, tmp_path):
    s = make_sampler(base, SimpleNamespace(backend="vllm", max_seq_len=64, max_lora_rank=8))
    assert isinstance(s, vb.VLLMSampler)
    try:
        snap = snapshot_of(base.decoder)
        r = s.sample(snap, [3, 4, 5], types.SamplingParams(max_tokens=3, stop=[10]), 2, True, timeout=60)
        assert [q.tokens for q in r.sequences] == [[6, 7, 8], [7, 8, 9]]
        assert [q.stop_reason for q in r.sequences] == ["length", "length"]
        assert r.sequences[0].logprobs == [-0.5] * 3 and r.prompt_logprobs == [None, -1.0, -2.0]
        (llm,) = fake_vllm
        assert llm.kw["model"] == str(base.path) and llm.kw["max_model_len"] == 64 and llm.kw["dtype"] == "float32"
        prompts, params, loras = llm.calls[0]
        assert prompts == [{"prompt_token_ids": [3, 4, 5]}] and loras == [None]
        assert params[0].kw["stop_token_ids"] == [10] and params[0].kw["n"] == 2

        with pytest.raises(ValueError, match="^max_tokens"):
            s.sample(snap, [3], types.SamplingParams(), timeout=60)
        assert len(llm.calls) == 1

        with pytest.raises(UserError, match="^snapshot: expected a WeightSnapshot"):
            s.sample(base.decoder, [3], types.SamplingParams(max_tokens=1), timeout=60)
        assert len(llm.calls) == 1
        # The engine passes tenant= to every sampler; the vLLM one accepts and ignores it.
        r = s.submit(snap, [3, 4], types.SamplingParams(max_tokens=1), tenant="t1").result(60)
        assert r.sequences[0].tokens == [5] and len(llm.calls) == 2 and llm.calls[1][2] == [None]

        lsnap = lora_snapshot(base.decoder, LoraSpec(rank=4, targets=NO_UNEMBED), 5)
        for _ in range(2):
            assert s.sample(lsnap, [1, 2], types.SamplingParams(max_tokens=2), timeout=60).sequences[0].tokens == [3, 4]
        (ra,), (rb,) = llm.calls[2][2], llm.calls[3][2]
        assert ra == rb and ra.path.endswith(f"adapter-{ra.id}") and s.exports.exports == 1 and len(fake_vllm) == 1

        full = full_snapshot(base.decoder)
        assert s.compute_logprobs(full, [5, 6, 7], timeout=60) == [None, -1.0, -2.0]
        assert len(fake_vllm) == 2 and llm.closed and "merged-" in fake_vllm[1].kw["model"]
        assert fake_vllm[1].kw["tokenizer"] == str(base.path)
        s.sample(snap, [3], types.SamplingParams(max_tokens=1), timeout=60)  # back to the base: a reload
        assert len(fake_vllm) == 3 and fake_vllm[2].kw["model"] == str(base.path)
    finally:
        s.stop()
    assert not s.cache_dir.exists()


# ---------------------------------------------------------------------------------- on a GPU with vLLM


def _gpu_skip_reason() -> str | None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "needs vllm (the `gpu` extra) and a CUDA GPU: vllm is not installed"
    import torch

    if not torch.cuda.is_available():
        return "needs vllm (the `gpu` extra) and a CUDA GPU: no CUDA GPU is visible"
    return None


_REASON = _gpu_skip_reason()


@pytest.mark.gpu
@pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
class TestOnGPU:
    """vLLM (GPU, fp32) against the JAX sampler (CPU under the test conftest, fp32) on small-qwen3."""

    PROMPTS = [[11, 12, 13, 14, 15], [100, 200, 300], [7] * 20]

    @pytest.fixture(scope="class")
    def gpu_base(self):
        from tinker_jax.hf.weights import load_decoder

        d = models_util.tiny_model_dir("small-qwen3")
        dec = load_decoder(d)
        return SimpleNamespace(name="small", path=d, cfg=dec.cfg, decoder=dec)

    @pytest.fixture(scope="class")
    def pair(self, gpu_base):
        cfg = SimpleNamespace(max_seq_len=256, max_num_samples=8, max_lora_rank=16, gpu_memory_utilization=0.3)
        v = make_sampler(gpu_base, SimpleNamespace(backend="vllm", **vars(cfg)))
        j = make_sampler(gpu_base, SimpleNamespace(backend="jax", max_batch=4, **vars(cfg)))
        yield v, j
        v.stop()
        j.stop()

    def _compare(self, pair, snap, params, **kw):
        v, j = pair
        for p in self.PROMPTS:
            a, b = v.sample(snap, p, params, **kw), j.sample(snap, p, params, **kw)
            for x, y in zip(a.sequences, b.sequences):
                assert x.tokens == y.tokens and x.stop_reason == y.stop_reason
                np.testing.assert_allclose(x.logprobs, y.logprobs, atol=2e-3)
            if a.prompt_logprobs is not None:
                np.testing.assert_allclose(a.prompt_logprobs[1:], b.prompt_logprobs[1:], atol=2e-3)

    def test_greedy_base(self, pair, gpu_base):
        self._compare(pair, snapshot_of(gpu_base.decoder), types.SamplingParams(max_tokens=24, temperature=0.0),
                      include_prompt_logprobs=True)

    def test_tempered_logprobs_of_seeded_samples(self, pair, gpu_base):
        # Tokens differ between backends (different RNGs); each backend's logprobs of its own tokens must
        # be log_softmax(logits / T): score vLLM's tokens with the JAX model as a prompt.
        v, j = pair
        snap = snapshot_of(gpu_base.decoder)
        r = v.sample(snap, self.PROMPTS[0], types.SamplingParams(max_tokens=8, temperature=0.7, seed=1))
        toks = r.sequences[0].tokens
        logits = np.asarray(gpu_base.decoder.logits(gpu_base.decoder(
            jnp.asarray([self.PROMPTS[0] + toks]), jnp.arange(len(self.PROMPTS[0]) + len(toks))[None])[0]))[0]
        ref = jax.nn.log_softmax(logits / 0.7, axis=-1)[len(self.PROMPTS[0]) - 1:-1]
        np.testing.assert_allclose(r.sequences[0].logprobs, np.asarray(ref)[np.arange(len(toks)), toks], atol=2e-3)

    def test_lora_snapshot(self, pair, gpu_base):
        snap = lora_snapshot(gpu_base.decoder, LoraSpec(rank=8, targets=NO_UNEMBED), 7)
        self._compare(pair, snap, types.SamplingParams(max_tokens=24, temperature=0.0))

    def test_full_finetune_snapshot(self, pair, gpu_base):
        self._compare(pair, full_snapshot(gpu_base.decoder, 0.001), types.SamplingParams(max_tokens=16,
                                                                                        temperature=0.0))

    def test_stop_strings_and_ids(self, pair, gpu_base):
        v, j = pair
        snap = snapshot_of(gpu_base.decoder)
        free = v.sample(snap, self.PROMPTS[0], types.SamplingParams(max_tokens=24, temperature=0.0, stop=[]))
        toks = free.sequences[0].tokens
        text = j.tokenizer.decode(toks[5:8])
        self._compare(pair, snap, types.SamplingParams(max_tokens=24, temperature=0.0, stop=[text]))
        self._compare(pair, snap, types.SamplingParams(max_tokens=24, temperature=0.0, stop=[toks[6]]))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_engine_with_vllm_backend_fails_at_start_without_vllm(tmp_path):
    from tinker_jax.config import EngineConfig, SamplerConfig
    from tinker_jax.engine import Engine
    from tinker_jax.sampling.vllm_backend import VLLMUnavailable

    with pytest.raises(VLLMUnavailable, match="gpu"):
        Engine(EngineConfig(data_dir=tmp_path, sampler=SamplerConfig(backend="vllm")))
