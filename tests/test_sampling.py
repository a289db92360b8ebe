"""Sampler tests against transformers on a tiny random Qwen3 (fp32, CPU).

One module-scoped Sampler serves most tests, so the kernels compile once (prefill: one row bucket and one
length bucket for prompts of <= 17 tokens; decode: a 32-slot view and the full cache).
"""

from __future__ import annotations

import os
import string
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tinker import types

from tinker_jax.errors import UserError
from tinker_jax.models.lora import Adapter, LoraSpec
from tinker_jax.hf.weights import load_decoder
from tinker_jax.sampling import Sampler, WeightSnapshot, kernels, make_sampler, scheduler, snapshot_of

EOS = 2
MAX_SEQ = 64
ROWS = 4


class CharTokenizer:
    """Token i decodes to one or two letters, so stop strings can span token boundaries."""

    def decode(self, ids):
        return "".join(string.ascii_lowercase[i % 26] * (1 + i % 2) for i in ids)


def P(**kw) -> types.SamplingParams:
    kw.setdefault("max_tokens", 12)
    return types.SamplingParams(**kw)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                   tie_word_embeddings=True, max_position_embeddings=256, eos_token_id=EOS,
                                   bos_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # std 0.2 keeps greedy output from collapsing into one repeated token
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny_qwen3")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def hf(hf_dir):
    return hf_dir[1]


@pytest.fixture(scope="module")
def snap(hf_dir):
    return snapshot_of(load_decoder(hf_dir[0]), name="base")


@pytest.fixture(scope="module")
def sampler(snap):
    # decode_lengths=(32,): short requests attend over a 32-slot view of the cache, longer ones over all of it.
    s = Sampler(snap.cfg, [EOS], max_batch=ROWS, max_seq_len=MAX_SEQ, prefill_lengths=(16,), prefill_batches=(4,),
                decode_steps=4, decode_lengths=(32,), max_num_samples=8, max_topk_prompt_logprobs=5,
                tokenizer=CharTokenizer())
    s.start()
    yield s
    s.stop()


def prompt_of(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 512, size=n).tolist()


def hf_greedy(hf, prompt, max_tokens):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=EOS,
                      pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def hf_logprobs(hf, tokens, temperature=1.0) -> np.ndarray:
    """[len(tokens), V] log_softmax(logits / T) of a full forward pass; row i predicts tokens[i + 1]."""
    with torch.no_grad():
        logits = hf(torch.tensor([tokens])).logits[0].double()
    return torch.log_softmax(logits / temperature, -1).numpy()


def sampled_lps_ref(hf, prompt, seq, temperature=1.0):
    lp = hf_logprobs(hf, prompt + seq, temperature)
    return np.array([lp[len(prompt) - 1 + i, t] for i, t in enumerate(seq)])


# -------------------------------------------------------------------------------------------- correctness


def test_greedy_matches_transformers_generate(sampler, snap, hf):
    for seed, n, max_tokens in [(0, 5, 16), (1, 1, 10), (2, 17, 20), (3, 9, 7)]:
        prompt = prompt_of(seed, n)
        seq = sampler.sample(snap, prompt, P(max_tokens=max_tokens, temperature=0.0)).sequences[0]
        ref = hf_greedy(hf, prompt, max_tokens)
        assert seq.tokens == ref, (n, max_tokens)
        assert seq.stop_reason == ("stop" if ref[-1] == EOS else "length")
        np.testing.assert_allclose(seq.logprobs, sampled_lps_ref(hf, prompt, ref), atol=1e-4)


def test_sampled_logprobs_and_prompt_logprobs_match_forward(sampler, snap, hf):
    prompt = prompt_of(10, 12)
    resp = sampler.sample(snap, prompt, P(max_tokens=20, seed=7, stop=[]), include_prompt_logprobs=True,
                          topk_prompt_logprobs=3)
    seq = resp.sequences[0]
    assert len(seq.tokens) == len(seq.logprobs) == 20 and seq.stop_reason == "length"
    np.testing.assert_allclose(seq.logprobs, sampled_lps_ref(hf, prompt, seq.tokens), atol=1e-4)
    lp = hf_logprobs(hf, prompt)
    assert resp.prompt_logprobs[0] is None and len(resp.prompt_logprobs) == len(prompt)
    np.testing.assert_allclose(resp.prompt_logprobs[1:], [lp[i - 1, prompt[i]] for i in range(1, len(prompt))],
                               atol=1e-4)
    topk = resp.topk_prompt_logprobs
    assert topk[0] is None and len(topk) == len(prompt)
    for i in range(1, len(prompt)):
        ref_ids = np.argsort(-lp[i - 1])[:3]
        assert [t for t, _ in topk[i]] == ref_ids.tolist()
        np.testing.assert_allclose([v for _, v in topk[i]], lp[i - 1, ref_ids], atol=1e-4)
    one = sampler.sample(snap, prompt[:1], P(max_tokens=3), include_prompt_logprobs=True, topk_prompt_logprobs=2)
    assert one.prompt_logprobs == [None] and one.topk_prompt_logprobs == [None]
    # compute_logprobs == prompt logprobs of a max_tokens=1 request (protocol doc §4.10)
    assert sampler.compute_logprobs(snap, prompt)[0] is None
    np.testing.assert_allclose(sampler.compute_logprobs(snap, prompt)[1:], resp.prompt_logprobs[1:], atol=1e-6)


def test_topk_sample_logprobs_match_forward(sampler, snap, hf):
    """topk_sample_logprobs k: each sampled position's k most likely tokens and their logprobs, of the distribution
    the token's logprob is reported from (log_softmax(logits / T); T = 1 for greedy), equal to transformers' forward
    pass; a request without it in the same decode calls gets none."""
    prompt = prompt_of(130, 8)
    for params in (P(max_tokens=6, seed=4, temperature=0.7, stop=[]), P(max_tokens=6, temperature=0.0)):
        with_topk = sampler.submit(snap, prompt, params, topk_sample_logprobs=3)
        without = sampler.submit(snap, prompt, params)
        seq = with_topk.result(timeout=120).sequences[0]
        assert without.result(timeout=120).sequences[0].topk_logprobs is None
        lp = hf_logprobs(hf, prompt + seq.tokens, params.temperature or 1.0)
        assert len(seq.topk_logprobs) == len(seq.tokens) == 6
        for i, row in enumerate(seq.topk_logprobs):
            ref = lp[len(prompt) - 1 + i]
            ids = np.argsort(-ref)[:3]
            assert [t for t, _ in row] == ids.tolist()
            np.testing.assert_allclose([v for _, v in row], ref[ids], atol=1e-4)
    bad = sampler.submit(snap, prompt, P(), topk_sample_logprobs=sampler.max_topk + 1)
    with pytest.raises(ValueError, match="topk_sample_logprobs"):
        bad.result(timeout=5)


def test_temperature_relation(sampler, snap, hf):
    """Reported logprob = log_softmax(logits / T)[token] (kernels.py docstring); greedy reports T = 1."""
    prompt = prompt_of(20, 8)
    for T in (0.7, 1.6):
        seq = sampler.sample(snap, prompt, P(max_tokens=10, temperature=T, seed=3, stop=[])).sequences[0]
        np.testing.assert_allclose(seq.logprobs, sampled_lps_ref(hf, prompt, seq.tokens, T), atol=1e-4)
        assert np.abs(np.array(seq.logprobs) - sampled_lps_ref(hf, prompt, seq.tokens, 1.0)).max() > 1e-2
    seq = sampler.sample(snap, prompt, P(max_tokens=10, temperature=0.0)).sequences[0]
    np.testing.assert_allclose(seq.logprobs, sampled_lps_ref(hf, prompt, seq.tokens, 1.0), atol=1e-4)


def test_top_k_and_top_p(sampler, snap, hf):
    prompt = prompt_of(30, 6)
    greedy = sampler.sample(snap, prompt, P(max_tokens=10, temperature=0.0, stop=[])).sequences[0].tokens
    assert sampler.sample(snap, prompt, P(max_tokens=10, top_k=1, seed=1, stop=[])).sequences[0].tokens == greedy
    for params in (P(max_tokens=10, top_k=3, seed=5, stop=[], temperature=1.5),
                   P(max_tokens=10, top_p=0.3, seed=6, stop=[], temperature=1.5),
                   P(max_tokens=10, top_k=4, top_p=0.5, seed=7, stop=[], temperature=1.5)):
        seq = sampler.sample(snap, prompt, params).sequences[0]
        lp = hf_logprobs(hf, prompt + seq.tokens, params.temperature)
        for i, tok in enumerate(seq.tokens):
            row = lp[len(prompt) - 1 + i]
            order = np.argsort(-row)
            k = params.top_k if params.top_k > 0 else len(row)
            kept = order[:k]
            probs = np.exp(row[kept] - np.logaddexp.reduce(row[kept]))
            n_p = int(np.sum(np.cumsum(probs) - probs < params.top_p))
            assert tok in kept[:n_p].tolist(), (params, i)


def test_seeds_and_batch_invariance(sampler, snap, hf):
    prompt = prompt_of(40, 7)
    params = P(max_tokens=14, seed=1234, stop=[])
    alone = sampler.sample(snap, prompt, params).sequences[0]
    assert sampler.sample(snap, prompt, params).sequences[0].tokens == alone.tokens
    other = sampler.sample(snap, prompt, P(max_tokens=14, seed=99, stop=[])).sequences[0]
    assert other.tokens != alone.tokens
    unseeded = [sampler.sample(snap, prompt, P(max_tokens=14, stop=[])).sequences[0].tokens for _ in range(2)]
    assert unseeded[0] != unseeded[1]
    # Same request with other traffic in the batch (it lands in another row, next to other params).
    noise = [sampler.submit(snap, prompt_of(41 + i, 3 + 2 * i), P(max_tokens=5 + 3 * i, temperature=0.5 + i / 4,
                                                                   top_k=10 * i, seed=i)) for i in range(3)]
    crowded = sampler.submit(snap, prompt, params)
    noise += [sampler.submit(snap, prompt_of(50, 4), P(max_tokens=9, top_p=0.8))]
    seq = crowded.result(timeout=60).sequences[0]
    assert seq.tokens == alone.tokens
    np.testing.assert_allclose(seq.logprobs, alone.logprobs, atol=1e-5)
    for f in noise:
        f.result(timeout=60)


def test_requests_sent_one_after_another_to_an_idle_sampler_start_together(sampler, snap):
    """burst_gap_ms: an idle sampler waits while requests keep arriving close together and takes them in one step,
    so 4 requests sent by a client's loop are prefilled in one call and decode together (the first no longer
    decodes alone for a call while the others wait), each sampling what it samples alone. Requests further apart
    than the gap (the shared sampler's default 2 ms) are taken as they come: one prefill each. (Prompts the
    shared sampler has not seen: its prefix cache would serve a seen one without a prefill.)"""
    prompts = [prompt_of(90 + i, 6) for i in range(ROWS)]
    params = P(max_tokens=6, temperature=0.0, stop=[])

    def send(s, pause: float) -> tuple[list, int]:
        before = s.stats["prefill_calls"]
        futs = []
        for x in prompts:
            futs.append(s.submit(snap, x, params))
            time.sleep(pause)  # the client's work between two requests
        out = [f.result(timeout=120).sequences[0] for f in futs]
        return out, s.stats["prefill_calls"] - before

    sampler.sample(snap, prompt_of(98, 6), params)  # compiled before the timing matters
    apart, calls = send(sampler, 0.3)
    assert calls == ROWS
    with Sampler(snap.cfg, [EOS], max_batch=ROWS, max_seq_len=MAX_SEQ, prefill_lengths=(16,), prefill_batches=(4,),
                 decode_steps=4, decode_lengths=(32,), tokenizer=CharTokenizer(), burst_gap_ms=50) as patient:
        patient.sample(snap, prompt_of(99, 6), params)  # compiles
        together, calls = send(patient, 0.01)
        assert calls == 1
    for a, b in zip(together, apart):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="burst_gap_ms: expected a number of milliseconds"):
        Sampler(snap.cfg, [EOS], max_batch=ROWS, max_seq_len=MAX_SEQ, burst_gap_ms=51)


def test_num_samples_share_prefill(sampler, snap, hf):
    prompt = prompt_of(60, 10)
    # 6 samples > 4 rows: two wait for free rows holding the prefill result.
    before = sampler.stats["prefill_calls"]
    greedy = sampler.sample(snap, prompt, P(max_tokens=8, temperature=0.0), num_samples=6)
    assert sampler.stats["prefill_calls"] == before + 1  # one prefill for all six
    ref = hf_greedy(hf, prompt, 8)
    assert [s.tokens for s in greedy.sequences] == [ref] * 6
    assert len({s.sequence_id for s in greedy.sequences}) == 6
    params = P(max_tokens=8, seed=77, stop=[])
    many = sampler.sample(snap, prompt, params, num_samples=5)
    assert len({tuple(s.tokens) for s in many.sequences}) > 1
    # sample j's key is (seed, j, step): sample 0 of a group equals the single sample with that seed
    assert many.sequences[0].tokens == sampler.sample(snap, prompt, params).sequences[0].tokens
    for s in many.sequences:
        np.testing.assert_allclose(s.logprobs, sampled_lps_ref(hf, prompt, s.tokens), atol=1e-4)


def test_continuous_batching_interleaves(sampler, snap, hf):
    before = dict(sampler.stats)
    jobs = [(prompt_of(70 + i, 2 + (5 * i) % 15), 3 + (7 * i) % 18) for i in range(10)]
    futs = [sampler.submit(snap, p, P(max_tokens=m, temperature=0.0)) for p, m in jobs]
    cancelled = sampler.submit(snap, [5, 6], P(max_tokens=30))
    cancelled.cancel()  # usually still queued; a cancelled request is dropped without disturbing the others
    for (prompt, max_tokens), fut in zip(jobs, futs):
        assert fut.result(timeout=120).sequences[0].tokens == hf_greedy(hf, prompt, max_tokens)
    assert sampler.stats["rows_joined_running_batch"] > before.get("rows_joined_running_batch", 0)
    assert sampler.stats["max_live_rows"] == ROWS


def test_lone_request_decodes_a_small_row_bucket(sampler, snap, hf):
    """With one live request the decode call runs on the smallest row bucket, not on all max_batch rows,
    and still gives the reference tokens."""
    prompt = prompt_of(90, 5)
    assert sampler.sample(snap, prompt, P(max_tokens=6, temperature=0.0)).sequences[0].tokens == \
        hf_greedy(hf, prompt, 6)
    assert sampler.stats["last_decode_rows"] == 1 < ROWS


# ------------------------------------------------------------------------------------------- stopping


def test_stop_tokens_strings_and_eos(sampler, snap):
    prompt = prompt_of(80, 6)
    base = sampler.sample(snap, prompt, P(max_tokens=20, seed=5, stop=[])).sequences[0].tokens
    # stop token ids: the stop token is the last returned token (protocol doc §2.6)
    tok = base[6]
    seq = sampler.sample(snap, prompt, P(max_tokens=20, seed=5, stop=[tok])).sequences[0]
    assert seq.tokens == base[: base.index(tok) + 1] and seq.stop_reason == "stop"
    # stop strings, detected while generating: ends at the token that completes the string
    tk = CharTokenizer()
    text = tk.decode(base)
    stop = text[len(tk.decode(base[:8])) - 1:][:3]
    end = next(j for j in range(len(base)) if stop in tk.decode(base[: j + 1]))
    seq = sampler.sample(snap, prompt, P(max_tokens=20, seed=5, stop=[stop, "zzzzzz"])).sequences[0]
    assert seq.tokens == base[: end + 1] and seq.stop_reason == "stop"
    assert len(seq.logprobs) == len(seq.tokens)
    seq = sampler.sample(snap, prompt, P(max_tokens=20, seed=5, stop="zzzzzz")).sequences[0]
    assert seq.tokens == base and seq.stop_reason == "length"
    # EOS: stops when stop is None; `[]` or an explicit stop list replaces it (SDK SamplingParams docstring)
    eos = base[3]
    with Sampler(snap.cfg, [eos], max_batch=ROWS, max_seq_len=MAX_SEQ, prefill_lengths=(16,),
                 prefill_batches=(4,), decode_steps=4, max_num_samples=8, max_topk_prompt_logprobs=5) as s2:
        seq = s2.sample(snap, prompt, P(max_tokens=20, seed=5)).sequences[0]
        assert seq.tokens == base[: base.index(eos) + 1] and seq.stop_reason == "stop"
        assert s2.sample(snap, prompt, P(max_tokens=20, seed=5, stop=[])).sequences[0].tokens == base
        assert s2.sample(snap, prompt, P(max_tokens=20, seed=5, stop=[7])).sequences[0].tokens[:4] == base[:4]

def test_stop_strings_see_the_raw_text():
    """A tokenizer that cleans up spaces before punctuation by default (transformers 4.x with Llama 3's config)
    must not hide a stop string " ." from the check; a decode without that keyword still works."""
    from tinker_jax.sampling.stops import StopStrings

    chars = "ab ."

    class Plain:  # decode(ids) only
        def decode(self, ids):
            return "".join(chars[i] for i in ids)

    class Cleaning(Plain):
        def decode(self, ids, clean_up_tokenization_spaces=True):
            text = super().decode(ids)
            return text.replace(" .", ".") if clean_up_tokenization_spaces else text

    ids = [0, 1, 2, 3]  # "ab ."
    assert Cleaning().decode(ids) == "ab."  # what the check saw before
    assert StopStrings(Cleaning(), [" ."]).hit(ids)
    assert not StopStrings(Cleaning(), [" ."]).hit(ids[:3])
    assert StopStrings(Plain(), [" ."]).hit(ids) and not StopStrings(Plain(), ["b."]).hit(ids)


# ------------------------------------------------------------------------------- snapshots and compiles


def _cache_sizes():
    return kernels.decode._cache_size(), kernels.prefill._cache_size(), kernels.insert_pages._cache_size()


def test_no_recompile_for_new_params_or_weights(sampler, snap, hf):
    prompt = prompt_of(90, 9)
    sampler.sample(snap, prompt, P(max_tokens=5), include_prompt_logprobs=True)
    sizes = _cache_sizes()
    for params in (P(max_tokens=3), P(max_tokens=17, temperature=0.3), P(max_tokens=6, top_k=7, top_p=0.9, seed=1),
                   P(max_tokens=4, temperature=0.0, stop=["ab", "c"]), P(max_tokens=2, stop=[5, 6, 7])):
        sampler.sample(snap, prompt, params, num_samples=3, include_prompt_logprobs=True, topk_prompt_logprobs=2)
        sampler.sample(snap, prompt_of(91, 3), params)
    assert _cache_sizes() == sizes
    # A new weight snapshot with the same shapes reuses the compiled programs and serves its own weights.
    bumped = WeightSnapshot(snap.cfg, snap.graphdef, jax.tree.map(lambda x: x * 1.05, snap.params), name="bumped")
    a = sampler.sample(snap, prompt, P(max_tokens=8, seed=3, stop=[])).sequences[0]
    b = sampler.sample(bumped, prompt, P(max_tokens=8, seed=3, stop=[])).sequences[0]
    assert _cache_sizes() == sizes
    assert not np.allclose(a.logprobs, b.logprobs)


def test_snapshots_alternate_in_one_sampler(sampler, snap):
    other = WeightSnapshot(snap.cfg, snap.graphdef, jax.tree.map(lambda x: x * 0.95, snap.params), name="other")
    jobs = [(s, prompt_of(100 + i, 4 + i), P(max_tokens=6 + i, seed=i, stop=[])) for i, s in
            enumerate([snap, other, snap, other, other, snap])]
    solo = [sampler.sample(*j).sequences[0].tokens for j in jobs]
    futs = [sampler.submit(*j) for j in jobs]
    assert [f.result(timeout=60).sequences[0].tokens for f in futs] == solo


def _lora_snapshot(snap, seed, rank=2, targets=("q", "k", "v", "o", "gate", "up", "down")):
    """A LoRA snapshot over `snap`'s base weights with random adapters, and the same model merged (W + s*A@B)."""
    from tinker_jax.models import lora as lora_math

    spec = LoraSpec(rank=rank, targets=targets)
    rng = np.random.default_rng(seed)
    shapes = lora_math.targeted(lora_math.shapes(snap.cfg, rank), spec)
    adapters = {n: {k: jnp.asarray(rng.normal(0, 0.3, sh), jnp.float32) for k, sh in w.items()}
                for n, w in shapes.items()}
    base = nnx.to_pure_dict(snap.params)
    merged = jax.tree.map(lambda x: x, base)
    for group, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
        for n in names:
            if n in adapters:
                a, b = adapters[n]["a"], adapters[n]["b"]
                merged["blocks"][group][n]["kernel"] = base["blocks"][group][n]["kernel"] + spec.scale * (a @ b)
    full = jax.tree.map(lambda x: x, snap.params)
    full.replace_by_pure_dict(merged)
    return (WeightSnapshot(snap.cfg, snap.graphdef, snap.params, Adapter(spec, adapters), name=f"lora{seed}"),
            WeightSnapshot(snap.cfg, snap.graphdef, full, name=f"merged{seed}"))


def test_lora_snapshot_samples_like_merged_weights(sampler, snap):
    prompt = prompt_of(110, 8)
    lora, merged = _lora_snapshot(snap, 0)
    params = P(max_tokens=10, seed=4, stop=[])
    a = sampler.sample(lora, prompt, params, include_prompt_logprobs=True)
    b = sampler.sample(merged, prompt, params, include_prompt_logprobs=True)
    base = sampler.sample(snap, prompt, params).sequences[0]
    assert a.sequences[0].tokens == b.sequences[0].tokens != base.tokens
    np.testing.assert_allclose(a.sequences[0].logprobs, b.sequences[0].logprobs, atol=1e-4)
    np.testing.assert_allclose(a.prompt_logprobs[1:], b.prompt_logprobs[1:], atol=1e-4)
    # The next adapter snapshot (same shapes, new values) reuses the compiled programs.
    sizes = _cache_sizes()
    lora2, merged2 = _lora_snapshot(snap, 1)
    c = sampler.sample(lora2, prompt, params).sequences[0]
    assert _cache_sizes() == sizes
    assert c.tokens == sampler.sample(merged2, prompt, params).sequences[0].tokens


def test_rows_of_different_adapters_share_decode_calls(sampler, snap):
    """Rows of the base model and of adapters of two ranks decode in the same device calls (each row with its own
    adapter) and sample exactly what each would alone."""
    lora_a, _ = _lora_snapshot(snap, 2)
    lora_b, _ = _lora_snapshot(snap, 3, rank=4, targets=("q", "v"))
    jobs = [(s, prompt_of(130 + i, 5 + i), P(max_tokens=6, seed=i, stop=[])) for i, s in
            enumerate([snap, lora_a, lora_b, lora_a])]
    solo = [sampler.sample(*j) for j in jobs]
    calls = sampler.stats["decode_calls"]
    futs = [sampler.submit(*j) for j in jobs]
    together = [f.result(timeout=60) for f in futs]
    for a, b in zip(together, solo):
        assert a.sequences[0].tokens == b.sequences[0].tokens
        np.testing.assert_allclose(a.sequences[0].logprobs, b.sequences[0].logprobs, atol=2e-5)
    assert sampler.stats["decode_calls"] - calls <= 2  # 6 tokens, decode_steps 4: all rows in the same calls
    assert len({tuple(s.sequences[0].tokens) for s in solo[:3]}) == 3  # the adapters really differ


def test_an_adapter_that_fails_to_load_fails_only_its_request(snap, monkeypatch):
    """An internal error while loading an adapter into its table (not the user's fault) fails that request with it,
    once (it is not left queued to fail the same way every step), and the sampler goes on serving the others."""
    lora, _ = _lora_snapshot(snap, 7)
    calls = []

    def lost(*args, **kw):
        calls.append(1)
        raise RuntimeError("device lost")

    monkeypatch.setattr(kernels, "put_adapter", lost)
    s = Sampler(snap.cfg, [EOS], max_batch=2, max_seq_len=MAX_SEQ, prefill_lengths=(16,), prefill_batches=(1, 2),
                decode_steps=4).drive(lambda: None)
    try:
        bad = s.submit(lora, prompt_of(150, 5), P(max_tokens=2, seed=1, stop=[]))
        good = s.submit(snap, prompt_of(151, 5), P(max_tokens=2, seed=1, stop=[]))
        for _ in range(6):
            s.step()
        with pytest.raises(RuntimeError, match="device lost"):
            bad.result(timeout=0)
        assert len(good.result(timeout=0).sequences[0].tokens) == 2 and len(calls) == 1
    finally:
        s.stop()


def test_adapter_table_evicts_unused_adapters(hf_dir, snap):
    """With room for one adapter per rank, requests of another adapter wait until the first one's rows finish,
    then take its place; results are unchanged."""
    lora_a, _ = _lora_snapshot(snap, 4)
    lora_b, _ = _lora_snapshot(snap, 5)
    with Sampler(snap.cfg, eos_token_ids=EOS, max_batch=ROWS, max_seq_len=MAX_SEQ, prefill_lengths=(16,),
                 prefill_batches=(1, 4), decode_steps=4, max_adapters=1) as one:
        jobs = [(s, prompt_of(140 + i, 6), P(max_tokens=5, seed=i, stop=[])) for i, s in
                enumerate([lora_a, lora_b, lora_a, lora_b])]
        together = [f.result(timeout=60) for f in [one.submit(*j) for j in jobs]]
        assert one.stats["adapter_loads"] >= 2
        assert one.stats_now()["resident_adapters"] == 1
    for a, j in zip(together, jobs):
        assert a.sequences[0].tokens == sampler_tokens(hf_dir, j)


def sampler_tokens(hf_dir, job):
    with Sampler(job[0].cfg, eos_token_ids=EOS, max_batch=ROWS, max_seq_len=MAX_SEQ, prefill_lengths=(16,),
                 prefill_batches=(1, 4), decode_steps=4) as s:
        return s.sample(*job).sequences[0].tokens


def test_make_sampler_for_engine_objects(hf_dir, snap, hf):
    """make_sampler(base, config) for a base model object as the engine holds it; EOS ids come from config.json
    + generation_config.json."""
    base = SimpleNamespace(cfg=snap.cfg, path=hf_dir[0], decoder=snap.model())
    conf = SimpleNamespace(max_batch=ROWS, max_seq_len=MAX_SEQ, max_num_samples=8)
    s = make_sampler(base, conf, prefill_lengths=(16,), prefill_batches=(4,), decode_steps=4,
                     max_topk_prompt_logprobs=5)
    try:
        assert s.eos_token_ids == (EOS,)
        prompt = prompt_of(120, 6)
        assert s.sample(snap, prompt, P(max_tokens=9, temperature=0.0)).sequences[0].tokens == \
            hf_greedy(hf, prompt, 9)
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field, call", [
    ("prompt_tokens", lambda s, snap: s.sample(snap, [], P())),
    ("prompt_tokens", lambda s, snap: s.sample(snap, [1] * MAX_SEQ, P(max_tokens=1))),
    ("prompt_tokens", lambda s, snap: s.sample(snap, [1, 512], P())),
    ("max_tokens", lambda s, snap: s.sample(snap, [1] * 60, P(max_tokens=5))),
    ("max_tokens", lambda s, snap: s.sample(snap, [1, 2], P(max_tokens=0))),
    ("max_tokens", lambda s, snap: s.sample(snap, [1, 2], types.SamplingParams())),
    ("top_p", lambda s, snap: s.sample(snap, [1, 2], P(top_p=0.0))),
    ("top_p", lambda s, snap: s.sample(snap, [1, 2], P(top_p=1.5))),
    ("temperature", lambda s, snap: s.sample(snap, [1, 2], P(temperature=-0.1))),
    ("num_samples", lambda s, snap: s.sample(snap, [1, 2], P(), num_samples=9)),
    ("num_samples", lambda s, snap: s.sample(snap, [1, 2], P(), num_samples=0)),
    ("stop", lambda s, snap: s.sample(snap, [1, 2], P(stop=[600]))),
    ("stop", lambda s, snap: s.sample(snap, [1, 2], P(stop=[""]))),
    ("topk_prompt_logprobs", lambda s, snap: s.sample(snap, [1, 2], P(), topk_prompt_logprobs=6)),
    ("snapshot", lambda s, snap: s.sample(object(), [1, 2], P())),
])
def test_bad_input_fails_only_its_request(sampler, snap, field, call):
    with pytest.raises(ValueError, match=f"^{field}:"):
        call(sampler, snap)
    assert sampler.sample(snap, [3, 4, 5], P(max_tokens=2)).sequences[0].stop_reason in ("stop", "length")


def test_stop_fails_outstanding_and_refuses_new(snap):
    s = Sampler(snap.cfg, [EOS], max_batch=ROWS, max_seq_len=MAX_SEQ, prefill_lengths=(16,), prefill_batches=(4,),
                decode_steps=4, max_num_samples=8, max_topk_prompt_logprobs=5)
    futs = [s.submit(snap, prompt_of(i, 5), P(max_tokens=40, stop=[])) for i in range(6)]
    time.sleep(0.2)
    s.stop(timeout=60)
    assert not s._thread.is_alive()
    for f in futs:  # each either finished or was failed; none hangs
        try:
            f.result(timeout=1)
        except RuntimeError as e:
            assert "stopped" in str(e)
    with pytest.raises(RuntimeError, match="stopped"):
        s.submit(snap, [1, 2], P()).result(timeout=1)


def test_unrolled_decode_and_longer_calls_sample_the_same(sampler, snap):
    """decode_unroll, decode_steps and decode_attention change how decode runs (configs/gpu-bf16.yaml sets
    decode_steps; on a CPU the default attention is "reduce", elsewhere "einsum"), and prefill_attention how a prompt
    is prefilled ("xla": jax.nn.dot_product_attention), not what it samples: the same greedy and seeded sequences,
    logprobs and prompt logprobs as the default sampler, in the short view and past it."""
    assert sampler.decode_attention == "reduce"  # auto on this CPU: the other path is compared against it
    with pytest.raises(ValueError, match="sampler.prefill_attention: cudnn needs bfloat16 compute"):
        Sampler(snap.cfg, [EOS], max_batch=ROWS, max_seq_len=MAX_SEQ, prefill_attention="cudnn")
    with pytest.raises(ValueError, match="sampler.prefill_attention: cudnn does not run here"):  # no cuDNN on a CPU
        Sampler(snap.cfg, [EOS], max_batch=ROWS, max_seq_len=MAX_SEQ, prefill_attention="cudnn",
                cache_dtype=jnp.bfloat16)
    with Sampler(snap.cfg, [EOS], max_batch=ROWS, max_seq_len=MAX_SEQ, prefill_lengths=(16,), prefill_batches=(4,),
                 decode_steps=16, decode_unroll=True, decode_lengths=(32,), max_num_samples=8,
                 decode_attention="einsum", prefill_attention="xla", tokenizer=CharTokenizer()) as other:
        for seed, n, params in [(60, 6, P(max_tokens=12, temperature=0.0)), (61, 6, P(max_tokens=12, seed=7, stop=[])),
                                (62, 6, P(max_tokens=9, temperature=0.7, top_p=0.9, seed=3, stop=[])),
                                (63, 16, P(max_tokens=24, temperature=0.0, stop=[]))]:
            prompt = prompt_of(seed, n)
            a, b = (s.sample(snap, prompt, params, include_prompt_logprobs=True) for s in (sampler, other))
            np.testing.assert_allclose(a.prompt_logprobs[1:], b.prompt_logprobs[1:], atol=1e-5)
            a, b = a.sequences[0], b.sequences[0]
            assert a.tokens == b.tokens
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_the_paged_kernel_samples_like_the_gathering_paths(sampler, snap):
    """decode_attention "paged" (the Pallas kernel that reads each row's pages in place; on this CPU in Pallas'
    interpreter) samples what the default path samples: mixed-length rows, past the first view, samples sharing
    their prompt's pages, a finished row's pages reused. Pages and heads must be powers of two: others are refused,
    naming the field. (Over a mesh: test_sampler_mesh.)"""
    with Sampler(snap.cfg, [EOS], max_batch=ROWS, max_seq_len=MAX_SEQ, prefill_lengths=(16,), prefill_batches=(4,),
                 decode_steps=8, decode_lengths=(32,), max_num_samples=8, decode_attention="paged",
                 tokenizer=CharTokenizer()) as other:
        assert other.decode_attention == "paged-interpret"
        jobs = [(prompt_of(70, 5), P(max_tokens=30, temperature=0.0), 1),
                (prompt_of(71, 14), P(max_tokens=12, seed=7, stop=[]), 3),
                (prompt_of(72, 3), P(max_tokens=20, temperature=0.8, seed=2, stop=[]), 1)]
        futs = [(sampler.submit(snap, x, p, num_samples=n), other.submit(snap, x, p, num_samples=n))
                for x, p, n in jobs]
        for a, b in futs:
            for x, y in zip(a.result(timeout=300).sequences, b.result(timeout=300).sequences):
                assert x.tokens == y.tokens
                np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="decode_attention: paged cannot serve .*power-of-two page size"):
        Sampler(snap.cfg, [EOS], max_batch=ROWS, max_seq_len=MAX_SEQ, decode_attention="paged", page_size=12)


def test_decode_loop_ends_when_its_rows_finish_or_a_row_frees(sampler, snap):
    """decode_steps bounds a device loop that ends early: when every row in it has finished, or, while a request
    waits for a row, right after the step that freed one. Rows of 10 tokens and of a stop token sampled second, with
    a 3-token request waiting (2 rows): the first call ends after 2 steps (the waiting request takes the freed row),
    the second when both rows finish, 8 steps later; a fixed 16-step loop would have run 32. Every sequence equals
    the same request alone."""
    prompts = [prompt_of(100 + i, 5 + i) for i in range(3)]
    free_run = sampler.sample(snap, prompts[1], P(max_tokens=5, seed=2, stop=[])).sequences[0].tokens
    assert free_run[1] != free_run[0]  # so the stop token ends the row at its second step, not its first
    params = [P(max_tokens=10, seed=1, stop=[]), P(max_tokens=5, seed=2, stop=[free_run[1]]),
              P(max_tokens=3, seed=3, stop=[])]
    s = Sampler(snap.cfg, [EOS], max_batch=2, max_seq_len=MAX_SEQ, prefill_lengths=(16,), prefill_batches=(4,),
                decode_steps=16, decode_lengths=(32,)).drive(lambda: None)  # stepped here, not on its own thread
    try:
        futs = [s.submit(snap, p, q) for p, q in zip(prompts, params)]
        steps = 0
        while not all(f.done() for f in futs):
            s.step()
            steps += 1
            assert steps < 10
        got = [f.result().sequences[0] for f in futs]
    finally:
        s.stop()
    assert [len(g.tokens) for g in got] == [10, 2, 3]
    assert (s.stats["decode_calls"], s.stats["decode_steps_run"]) == (2, 10)
    for prompt, q, g in zip(prompts, params, got):
        alone = sampler.sample(snap, prompt, q).sequences[0]
        assert g.tokens == alone.tokens
        np.testing.assert_allclose(g.logprobs, alone.logprobs, atol=1e-5)


def test_long_prompt_beside_short_ones(snap, hf):
    """A 4,000-token prompt is prefilled a 512-token chunk per sampler step, so 10-token requests that arrive with
    it decode to the end while it is still prefilling (no stall). Every request's tokens and logprobs equal the same
    request alone; the long one's prompt logprobs and sampled logprobs equal transformers' forward pass, and its
    greedy tokens transformers' greedy."""
    long_prompt = prompt_of(120, 4000)
    shorts = [prompt_of(121 + i, 10) for i in range(3)]
    greedy, seeded = P(max_tokens=6, temperature=0.0), P(max_tokens=6, seed=9, stop=[])
    # A KV cache of 4,200 tokens for 4 rows of up to 4,100: the long row takes 251 pages of 16, the short ones 1 each.
    s = Sampler(snap.cfg, [EOS], max_batch=4, max_seq_len=4100, prefill_lengths=(16, 4096), prefill_batches=(1, 4),
                prefill_token_budget=4096, decode_steps=4, prefill_chunk=512, kv_cache_tokens=4200).drive(lambda: None)

    def run(futs):
        for _ in range(40):
            if all(f.done() for f in futs):
                return [f.result() for f in futs]
            s.step()
        raise AssertionError("requests did not finish in 40 steps")

    try:
        futs = [s.submit(snap, long_prompt, greedy, include_prompt_logprobs=True)]
        futs += [s.submit(snap, p, seeded) for p in shorts]
        run(futs[1:])  # the short ones finish first ...
        assert not futs[0].done() and s.stats["prefill_chunks"] < 8  # ... while the long one is still prefilling
        together = run(futs)
        assert s.stats["prefill_chunks"] == 8
        # ceil((3,999 + 6) / 16): the long row's, shorts long gone but for their prompts' one page each, cached
        assert s.stats["kv_pages_peak"] == 251 + 3
        alone = [run([s.submit(snap, long_prompt, greedy, include_prompt_logprobs=True)])[0]]
        alone += [run([s.submit(snap, p, seeded)])[0] for p in shorts]
    finally:
        s.stop()
    for a, b in zip(together, alone):
        assert a.sequences[0].tokens == b.sequences[0].tokens
        np.testing.assert_allclose(a.sequences[0].logprobs, b.sequences[0].logprobs, atol=1e-5)
    seq = together[0].sequences[0]
    assert seq.tokens == hf_greedy(hf, long_prompt, 6)[:len(seq.tokens)] and seq.tokens
    lp = hf_logprobs(hf, long_prompt + seq.tokens)
    np.testing.assert_allclose(together[0].prompt_logprobs[1:],
                               [lp[i, t] for i, t in enumerate(long_prompt[1:])], atol=1e-4)
    np.testing.assert_allclose(seq.logprobs, [lp[len(long_prompt) - 1 + i, t] for i, t in enumerate(seq.tokens)],
                               atol=1e-4)


def _assert_pages_held_only_by_the_cache(s):
    """Once nothing runs, each page's holders are exactly the prefix-cache entries that list it (no page lost or
    freed twice)."""
    holders = np.zeros_like(s._pages._refs)
    for shard, pages in s._prefix.values():
        for p in pages:
            holders[shard, p] += 1
    np.testing.assert_array_equal(s._pages._refs, holders)
    assert s._pages.used() == int((holders > 0).sum())


def _run_steps(s, futs, limit=60):
    for _ in range(limit):
        if all(f.done() for f in futs):
            return [f.result() for f in futs]
        s.step()
    raise AssertionError(f"requests did not finish in {limit} steps")


def test_samples_share_prompt_pages(snap, hf):
    """12 samples of a 40-token prompt on 8 rows: one prefill; its 2 full KV pages (positions 0-31) are copied into
    the pool once and listed by every sample's row, including the 4 placed after the first 8 finish (the request
    holds its pages meanwhile), and each sample gets its own copy of the partly filled third page (decode writes
    from position 39 on). Tokens and logprobs equal those of a sampler with 64-token pages (nothing shared: every
    sample a copy of its own), and the sampled logprobs equal transformers' forward pass."""
    prompt, params = prompt_of(130, 40), P(max_tokens=10, seed=5, stop=[])

    def run(**kw):
        s = Sampler(snap.cfg, [EOS], max_batch=8, max_seq_len=MAX_SEQ, prefill_lengths=(48,), prefill_batches=(1,),
                    decode_steps=4, max_num_samples=12, **kw).drive(lambda: None)
        try:
            return _run_steps(s, [s.submit(snap, prompt, params, num_samples=12)])[0], s.stats
        finally:
            s.stop()

    shared, stats = run()
    assert stats["prefill_calls"] == 1
    assert stats["kv_pages_copied"] == 2 + 12  # the full pages once, the partial page per sample
    assert stats["kv_pages_shared"] == 11 * 2  # the other 11 rows list the first sample's full pages
    assert stats["kv_pages_peak"] == 2 + 8 * 2  # shared pages + 8 rows' own (positions 32-48: 2 pages each)
    unshared, u_stats = run(page_size=64)
    assert u_stats["kv_pages_shared"] == 0 and u_stats["kv_pages_copied"] == 12
    assert len({tuple(x.tokens) for x in shared.sequences}) > 1
    for a, b in zip(shared.sequences, unshared.sequences):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    for x in shared.sequences[:2] + shared.sequences[-2:]:
        np.testing.assert_allclose(x.logprobs, sampled_lps_ref(hf, prompt, x.tokens), atol=1e-4)


def test_identical_prompts_share_one_prefill_row_and_their_pages(snap):
    """A GRPO group sent as separate requests of one prompt (tinker-cookbook samples each rollout alone): 6 requests
    of one 40-token prompt with different seeds and a 7th of another prompt, submitted together, prefill 2 rows in
    one call (prefill_rows_shared 5), and the 6 list one copy of their prompt's 2 full KV pages (each row still gets
    its own copy of the partly filled third page). Every request's tokens and logprobs equal those of the same
    request sampled alone by a sampler without the prefix cache; sampled alone again by this one, each finds its
    whole prompt cached and is not prefilled at all (the cache holds each prompt's 3 pages), with the same
    results."""
    prompt, other = prompt_of(140, 40), prompt_of(141, 40)
    params = [P(max_tokens=6, seed=seed, stop=[]) for seed in range(6)]
    jobs = [(prompt, p) for p in params] + [(other, params[0])]

    def make(cache):
        return Sampler(snap.cfg, [EOS], max_batch=8, max_seq_len=MAX_SEQ, prefill_lengths=(48,),
                       prefill_batches=(1, 2, 4, 8), decode_steps=4, max_num_samples=4,
                       prefix_cache=cache).drive(lambda: None)

    s, ref = make(True), make(False)
    try:
        together = _run_steps(s, [s.submit(snap, x, p) for x, p in jobs])
        stats = dict(s.stats)
        assert stats["prefill_calls"] == 1 and stats["prefill_rows_shared"] == 5
        assert stats["kv_pages_copied"] == 2 * 2 + 7  # each prompt's full pages once, the partial page per row
        assert stats["kv_pages_shared"] == 5 * 2
        assert len({tuple(r.sequences[0].tokens) for r in together[:6]}) > 1  # the seeds differ, so do the samples
        assert s.stats_now()["kv_pages_used"] == 2 * 3  # every row gone; each prompt's pages cached
        for (x, p), got in zip(jobs, together):
            want = _run_steps(ref, [ref.submit(snap, x, p)])[0].sequences[0]  # alone, prefilled
            again = _run_steps(s, [s.submit(snap, x, p)])[0]  # alone, from the cache
            assert again.prompt_cache_hit_tokens == len(x) - 1
            for seq in (got.sequences[0], again.sequences[0]):
                assert seq.tokens == want.tokens
                np.testing.assert_allclose(seq.logprobs, want.logprobs, atol=1e-5)
        assert s.stats["prefill_calls"] == 1 and s.stats["prompt_cache_hits"] == len(jobs)
        assert s.stats["kv_pages_copied"] - stats["kv_pages_copied"] == len(jobs)  # the partial page, per row
        assert ref.stats["prefill_calls"] == len(jobs) and ref.stats_now()["kv_pages_used"] == 0
    finally:
        s.stop()
        ref.stop()


def test_kv_cache_exhaustion_waits_or_refuses(snap):
    """A 3-page KV cache (48 tokens) and 4 rows: two requests of 3 pages each cannot run at once, so the second
    waits for the first's pages (rows are free) and then runs; a request that could never fit (4 pages) fails at
    once naming max_tokens. The others' tokens and logprobs equal each request run alone afterwards."""
    prompts = [prompt_of(140 + i, 20) for i in range(2)]
    params = P(max_tokens=20, seed=3, stop=[])  # positions 0-38: 3 pages of 16
    s = Sampler(snap.cfg, [EOS], max_batch=4, max_seq_len=MAX_SEQ, prefill_lengths=(32,), prefill_batches=(1, 2),
                decode_steps=4, kv_cache_tokens=48).drive(lambda: None)
    try:
        too_big = s.submit(snap, prompt_of(142, 40), P(max_tokens=24, seed=3))  # positions 0-62: 4 pages
        futs = [s.submit(snap, p, params) for p in prompts]
        with pytest.raises(UserError, match="max_tokens: .* need 4 KV-cache pages of 16 tokens; this sampler has 3"):
            too_big.result(timeout=0)
        s.step()
        assert s.stats_now()["running_rows"] == 1 and s.stats["kv_page_waits"] >= 1  # rows free, pages not
        got = _run_steps(s, futs)
        # 3 at most; at the end the second prompt's 2 pages, cached (the first's gave way to it)
        assert s.stats["kv_pages_peak"] == 3 and s.stats_now()["kv_pages_used"] == 2
        alone = [_run_steps(s, [s.submit(snap, p, params)])[0] for p in prompts]
    finally:
        s.stop()
    for a, b in zip(got, alone):
        assert a.sequences[0].tokens == b.sequences[0].tokens and len(a.sequences[0].tokens) == 20
        np.testing.assert_allclose(a.sequences[0].logprobs, b.sequences[0].logprobs, atol=1e-5)


def test_chunked_prefill_of_an_adapter_while_another_adapter_loads(snap):
    """A LoRA request's prompt prefilled 8 tokens per step, while a request of a second adapter (same rank) loads
    into the adapter table mid-prefill: each equals the same request alone."""
    lora_a, _ = _lora_snapshot(snap, 5)
    lora_b, _ = _lora_snapshot(snap, 6)
    jobs = [(lora_a, prompt_of(140, 40), P(max_tokens=4, seed=1, stop=[])),
            (lora_b, prompt_of(141, 5), P(max_tokens=4, seed=2, stop=[]))]
    s = Sampler(snap.cfg, [EOS], max_batch=2, max_seq_len=MAX_SEQ, prefill_lengths=(16, 48), prefill_batches=(1,),
                decode_steps=4, decode_lengths=(32,), prefill_chunk=8).drive(lambda: None)
    try:
        def run(futs):
            for _ in range(30):
                if all(f.done() for f in futs):
                    return [f.result().sequences[0] for f in futs]
                s.step()
            raise AssertionError("requests did not finish in 30 steps")

        first = s.submit(*jobs[0])
        s.step()  # its first chunk, with only its adapter in the table
        assert s.stats["prefill_chunks"] == 1
        together = run([first, s.submit(*jobs[1])])
        alone = [run([s.submit(*j)])[0] for j in jobs]
    finally:
        s.stop()
    assert s.stats["adapter_loads"] >= 2
    for a, b in zip(together, alone):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_long_prompts_prefill_their_chunks_in_shared_calls(snap, monkeypatch):
    """Three long prompts of two adapters (one rank) that arrive together are prefilled a chunk each per call, in
    one call per step (5 calls for 5 + 4 + 3 chunks, not 12), each chunk at its own start over its own pages,
    attending over the pages before it only (a first chunk: one page, its slots masked); each request, prompt
    logprobs included, equals the same request alone."""
    real, reads = kernels.prefill_pages, []

    def recording(*a, **kw):
        start, read = a[10], kw["read_table"]
        reads.append((int(np.max(start)), read.shape[1]))
        return real(*a, **kw)

    monkeypatch.setattr(kernels, "prefill_pages", recording)
    lora_a, _ = _lora_snapshot(snap, 5)
    lora_b, _ = _lora_snapshot(snap, 6)
    jobs = [(lora_a, prompt_of(190, 40), P(max_tokens=4, seed=1, stop=[])),  # 39 positions: 5 chunks of 8
            (lora_b, prompt_of(191, 33), P(max_tokens=5, seed=2, stop=[])),  # 4 chunks
            (lora_a, prompt_of(192, 25), P(max_tokens=3, seed=3, stop=[]))]  # 3 chunks
    s = Sampler(snap.cfg, [EOS], max_batch=4, max_seq_len=MAX_SEQ, prefill_lengths=(16, 48), prefill_batches=(1, 4),
                decode_steps=4, decode_lengths=(32,), prefill_chunk=8, prefix_cache=False).drive(lambda: None)
    try:  # (no prefix cache: alone, each prompt is prefilled again)
        futs = [s.submit(*j, include_prompt_logprobs=i == 1) for i, j in enumerate(jobs)]
        together = _run_steps(s, futs)
        assert (s.stats["prefill_chunks"], s.stats["prefill_chunk_calls"]) == (12, 5)
        alone = [_run_steps(s, [s.submit(*j, include_prompt_logprobs=i == 1)])[0] for i, j in enumerate(jobs)]
        assert s.stats["prefill_chunk_calls"] == 5 + 12  # alone: a call per chunk
    finally:
        s.stop()
    # (the calls' start, pages read): 16-token pages, chunks of 8: the pages before the chunk's start (24: 2, its
    # second partly written), in powers of two, at least 1 (the 40-token prompt's table has 3)
    assert reads[:5] == [(0, 1), (8, 1), (16, 1), (24, 2), (32, 2)]
    for a, b in zip(together, alone):
        assert a.sequences[0].tokens == b.sequences[0].tokens
        np.testing.assert_allclose(a.sequences[0].logprobs, b.sequences[0].logprobs, atol=1e-5)
    np.testing.assert_allclose(together[1].prompt_logprobs[1:], alone[1].prompt_logprobs[1:], atol=1e-5)
    assert together[0].sequences[0].tokens != together[2].sequences[0].tokens


def test_a_failing_prefill_chunk_fails_only_its_request(snap, monkeypatch):
    """A device error in a later chunk of a long prompt's prefill fails that request alone: a request decoding
    beside it finishes with the tokens it has alone."""
    s = Sampler(snap.cfg, [EOS], max_batch=2, max_seq_len=MAX_SEQ, prefill_lengths=(16, 48), prefill_batches=(1,),
                decode_steps=4, decode_lengths=(32,), prefill_chunk=8).drive(lambda: None)
    real, calls = kernels.prefill_pages, []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected device failure")
        return real(*a, **kw)

    monkeypatch.setattr(kernels, "prefill_pages", flaky)
    short = (snap, prompt_of(150, 5), P(max_tokens=8, seed=3, stop=[]))
    try:
        futs = [s.submit(snap, prompt_of(151, 40), P(max_tokens=4)), s.submit(*short)]
        for _ in range(20):
            if all(f.done() for f in futs):
                break
            s.step()
        with pytest.raises(RuntimeError, match="injected"):
            futs[0].result(timeout=0)
        got = futs[1].result(timeout=0).sequences[0]
        assert not s._prefilling and not s.has_work()
        _assert_pages_held_only_by_the_cache(s)  # the failed prompt's pages came back
        alone = s.submit(*short)
        while not alone.done():
            s.step()
    finally:
        s.stop()
    assert got.tokens == alone.result().sequences[0].tokens


def test_a_long_prompt_is_prefilled_into_pool_pages_and_waits_for_them(snap):
    """A long prompt's chunks write its KV into pages of the pool (kv_cache_tokens bounds it; no cache of its own
    beside the pool): with a 6-page pool of which a running row holds 4, its 3 prompt pages do not fit, so its
    prefill waits for that row to finish instead of starting; then it takes exactly its 3 pages while it is
    prefilled, and its tokens and logprobs equal the same request's on an idle sampler."""
    s = Sampler(snap.cfg, [EOS], max_batch=2, max_seq_len=MAX_SEQ, prefill_lengths=(16, 48), prefill_batches=(1,),
                decode_steps=4, decode_lengths=(32,), prefill_chunk=8, page_size=16, kv_cache_tokens=6 * 16,
                prefix_cache=False).drive(lambda: None)
    long_job = (snap, prompt_of(160, 40), P(max_tokens=3, seed=4, stop=[]))  # 39 positions: 3 pages, 5 chunks
    try:
        short = s.submit(snap, prompt_of(161, 5), P(max_tokens=48, seed=5, stop=[]))  # ceil((4 + 48) / 16) = 4
        s.step()
        chunks = s.stats["prefill_chunks"]  # (the short prompt's one chunk: its bucket, 16, is over 8)
        long_fut = s.submit(*long_job)
        while not short.done():
            s.step()
            assert s.stats["prefill_chunks"] == chunks or short.done()  # no room for its pages while the row runs
        s.step()  # its first chunk
        assert s.stats["prefill_chunks"] == chunks + 1 and s._pages.used() == 3
        (together,) = _run_steps(s, [long_fut])
        assert s._pages.used() == 0
        (alone,) = _run_steps(s, [s.submit(*long_job)])
    finally:
        s.stop()
    assert together.sequences[0].tokens == alone.sequences[0].tokens
    np.testing.assert_allclose(together.sequences[0].logprobs, alone.sequences[0].logprobs, atol=1e-5)


def test_a_long_prompt_cached_whole_is_served_from_the_cache_when_the_pool_is_full(snap):
    """A long prompt sampled again while a running row leaves no free page is served from the prefix cache (not
    prefilled in chunks after its cached pages were evicted to make room for them), and equals its first answer."""
    s = Sampler(snap.cfg, [EOS], max_batch=2, max_seq_len=MAX_SEQ, prefill_lengths=(16, 48), prefill_batches=(1,),
                decode_steps=4, decode_lengths=(32,), prefill_chunk=8, page_size=16,
                kv_cache_tokens=6 * 16).drive(lambda: None)
    long_job = (snap, prompt_of(170, 40), P(max_tokens=3, seed=4, stop=[]))  # 2 full prompt pages + 1 partial
    try:
        (first,) = _run_steps(s, [s.submit(*long_job)])
        short = s.submit(snap, prompt_of(171, 5), P(max_tokens=40, seed=5, stop=[]))  # takes the 3 free pages
        s.step()
        assert s._pages.free(0) == 0 and not short.done()
        chunks, hits = s.stats["prefill_chunks"], s.stats["prompt_cache_hits"]
        (again,) = _run_steps(s, [s.submit(*long_job)])
        assert s.stats["prefill_chunks"] == chunks and s.stats["prompt_cache_hits"] == hits + 1
        _run_steps(s, [short])
    finally:
        s.stop()
    assert again.sequences[0].tokens == first.sequences[0].tokens
    np.testing.assert_allclose(again.sequences[0].logprobs, first.sequences[0].logprobs, atol=1e-5)


def test_a_long_prompt_waiting_for_its_adapter_evicts_nothing(snap):
    """One adapter slot, held by a running row of adapter A; a long prompt of adapter B could start only by evicting
    a cached prompt's pages (the pool is full): it waits for the slot without evicting them (before, its first
    step waiting evicted what it would need, for nothing), then runs."""
    lora_a, _ = _lora_snapshot(snap, 7)
    lora_b, _ = _lora_snapshot(snap, 8)
    s = Sampler(snap.cfg, [EOS], max_batch=2, max_seq_len=MAX_SEQ, prefill_lengths=(16, 48), prefill_batches=(1,),
                decode_steps=4, decode_lengths=(32,), prefill_chunk=8, page_size=16, kv_cache_tokens=6 * 16,
                max_adapters=1).drive(lambda: None)
    try:
        _run_steps(s, [s.submit(snap, prompt_of(180, 40), P(max_tokens=2, seed=1, stop=[]))])  # 3 pages cached
        running = s.submit(lora_a, prompt_of(181, 5), P(max_tokens=40, seed=2, stop=[]))  # the 3 free pages
        s.step()
        assert s._pages.free(0) == 0 and not running.done()
        waiting = s.submit(lora_b, prompt_of(182, 40), P(max_tokens=3, seed=3, stop=[]))
        chunks = s.stats["prefill_chunks"]
        while not running.done():
            s.step()
            assert s.stats["prefix_cache_evictions"] == 0
            assert s.stats["prefill_chunks"] == chunks or running.done()
        (got,) = _run_steps(s, [waiting])
    finally:
        s.stop()
    assert len(got.sequences[0].tokens) == 3 and s.stats["prefill_chunks"] > chunks


def test_a_chunk_that_takes_the_pool_down_fails_what_was_in_flight_and_the_sampler_goes_on(snap, monkeypatch):
    """A long prompt's chunk writes into the pool, which its call consumes: when that call fails after the pool is
    gone, the prompt's request fails (it is not left waiting for ever), and so does the row decoding beside it
    (its cache went with the pool); the sampler then serves a new request as before."""
    s = Sampler(snap.cfg, [EOS], max_batch=2, max_seq_len=MAX_SEQ, prefill_lengths=(16, 48), prefill_batches=(1,),
                decode_steps=4, decode_lengths=(32,), prefill_chunk=32).drive(lambda: None)
    real = kernels.prefill_pages

    def broken(pl, *a, **kw):
        for x in a[7]:  # the pool (k, v)
            x.delete()
        raise RuntimeError("injected device failure")

    short = (snap, prompt_of(152, 5), P(max_tokens=8, seed=3, stop=[]))
    try:
        (want,) = _run_steps(s, [s.submit(*short)])
        running = s.submit(*short)
        s.step()
        monkeypatch.setattr(kernels, "prefill_pages", broken)
        failed = s.submit(snap, prompt_of(153, 40), P(max_tokens=4))
        s.step()
        for f in (failed, running):
            with pytest.raises(RuntimeError, match="injected"):
                f.result(timeout=0)
        assert not s.has_work() and s._pages.used() == 0
        monkeypatch.setattr(kernels, "prefill_pages", real)
        (got,) = _run_steps(s, [s.submit(*short)])
    finally:
        s.stop()
    assert got.sequences[0].tokens == want.sequences[0].tokens


def test_pages_held_from_the_prefix_cache_never_block_the_request_ahead(snap):
    """A request (A) that needs the whole pool, prefilled beside one (B) that starts with pages found in the prefix
    cache: B holds those pages from its prefill on, and used to wait behind A for a row while A waited for B's pages,
    nothing running to free any (for ever). With nothing else to wait for, B takes a row first; both sample what
    each samples alone."""
    def sampler():
        return Sampler(snap.cfg, max_batch=4, max_seq_len=32, page_size=4, kv_cache_tokens=16,
                       prefill_lengths=(8, 16, 32), prefill_batches=(4,), prefill_chunk=None, decode_steps=4,
                       burst_gap_ms=0).drive(lambda: None)

    P = lambda n: types.SamplingParams(max_tokens=n, seed=1, stop=[])  # noqa: E731
    base, a = prompt_of(150, 9), prompt_of(151, 13)  # a: 4 pages with its tokens, the whole pool
    b = base[:8] + prompt_of(152, 6)  # starts with base's 2 full pages, cached once base has run
    s = sampler()
    _run_steps(s, [s.submit(snap, base, P(1))])
    got = _run_steps(s, [s.submit(snap, a, P(4)), s.submit(snap, b, P(1))], limit=30)
    assert s.stats["prefix_cache_hit_tokens"] == 8  # b's first pages came from the cache
    for prompt, n, out in ((a, 4, got[0]), (b, 1, got[1])):
        alone = sampler()
        want = _run_steps(alone, [alone.submit(snap, prompt, P(n))])[0]
        assert out.sequences[0].tokens == want.sequences[0].tokens
        np.testing.assert_allclose(out.sequences[0].logprobs, want.sequences[0].logprobs, atol=1e-5)
    assert s.stats_now()["kv_pages_used"] <= 4 and not s._deferred


def test_a_long_prompt_on_cached_pages_a_running_row_holds(snap):
    """A long (chunked) prompt whose first pages are cached and still held by a running row: it needs free pages
    for the rest of its prompt only. It used to ask for its whole prompt, evict every cache entry on the shard
    (its own prefix too, which frees nothing a row holds), and fail with an internal AssertionError."""
    def sampler():
        return Sampler(snap.cfg, max_batch=4, max_seq_len=64, page_size=4, kv_cache_tokens=60,
                       prefill_lengths=(8, 16, 32, 64), prefill_batches=(1, 4), prefill_chunk=8, decode_steps=4,
                       burst_gap_ms=0).drive(lambda: None)

    P = lambda n: types.SamplingParams(max_tokens=n, seed=1, stop=[])  # noqa: E731
    e = prompt_of(153, 9)
    long = e[:8] + prompt_of(154, 12)  # 5 prompt pages, the first 2 e's
    s = sampler()
    running = s.submit(snap, e, P(40))
    s.step()  # e decodes, holding its 2 prompt pages (cached), and 12 of the 15 pages; 3 are free
    got = _run_steps(s, [s.submit(snap, long, P(4)), running], limit=80)
    assert s.stats["prefix_cache_hit_tokens"] >= 8  # it started from e's cached pages
    alone = sampler()
    want = _run_steps(alone, [alone.submit(snap, long, P(4))])[0]
    assert got[0].sequences[0].tokens == want.sequences[0].tokens
    np.testing.assert_allclose(got[0].sequences[0].logprobs, want.sequences[0].logprobs, atol=1e-5)


def test_a_long_prompt_short_of_pages_is_not_starved_by_short_requests(snap):
    """4 rows and 8 pages of 8 tokens; short requests (2 pages each) keep arriving, one for each that finishes, so
    pages never pile up on their own; a 40-token prompt needs 5 pages for its chunks: once it waits for pages,
    requests after it do not start (prefill_waits_for_pages), so it starts, and finishes, in bounded time."""
    s = Sampler(snap.cfg, [EOS], max_batch=4, max_seq_len=MAX_SEQ, prefill_lengths=(8, 48), prefill_batches=(1, 4),
                decode_steps=2, decode_lengths=(32,), prefill_chunk=8, page_size=8, kv_cache_tokens=8 * 8,
                prefix_cache=False).drive(lambda: None)
    shorts = iter(range(1000))

    def short(n):  # ceil((4 + n) / 8) = 2 pages for n <= 12
        return s.submit(snap, prompt_of(200 + next(shorts), 5), P(max_tokens=n, seed=1, stop=[]))

    try:
        running = [short(n) for n in (4, 6, 8, 10)]
        s.step()
        long_fut = s.submit(snap, prompt_of(199, 40), P(max_tokens=2, seed=2, stop=[]))
        for _ in range(60):
            if long_fut.done():
                break
            s.step()
            running = [f for f in running if not f.done()] + [short(12) for f in running if f.done()]
        assert long_fut.done() and long_fut.result(timeout=0).sequences[0].tokens
        assert s.stats["prefill_waits_for_pages"] > 0
        _run_steps(s, running, limit=200)
    finally:
        s.stop()


def test_target_prompt_logprobs_match_forward(sampler, snap, hf):
    """target_prompt_logprobs: the logprobs of chosen ids at each prompt position (row i: position i + 1) equal
    transformers' forward pass; -1 cells get 0.0; a CSR request gets a CSR answer with its own indices; prompt
    logprobs are not returned unless asked; a wrong shape or id is refused naming the field."""
    prompt = prompt_of(160, 9)
    lp = hf_logprobs(hf, prompt)  # row i: the distribution over prompt[i + 1]
    ids = np.random.default_rng(0).integers(0, 512, (8, 3))
    ids[2, 1] = -1
    dense = types.TensorData(data=ids.reshape(-1).tolist(), dtype="int64", shape=[8, 3])
    resp = sampler.submit(snap, prompt, P(max_tokens=2), target_prompt_logprobs=dense).result(timeout=60)
    assert resp.prompt_logprobs is None and resp.target_prompt_logprobs.shape == [8, 3]
    want = np.where(ids >= 0, lp[np.arange(8)[:, None], np.maximum(ids, 0)], 0.0)
    np.testing.assert_allclose(np.asarray(resp.target_prompt_logprobs.data).reshape(8, 3), want, atol=1e-4)

    crow, col, vals = [0, 1, 1, 3, 3, 3, 3, 3, 4], [2, 0, 1, 0], [5, 7, 11, 13]
    csr = types.TensorData(data=vals, dtype="int64", shape=[8, 3], sparse_crow_indices=crow, sparse_col_indices=col)
    got = sampler.submit(snap, prompt, P(max_tokens=2), target_prompt_logprobs=csr).result(timeout=60)
    t = got.target_prompt_logprobs
    assert (t.sparse_crow_indices, t.sparse_col_indices, t.shape) == (crow, col, [8, 3])
    np.testing.assert_allclose(t.data, [lp[0, 5], lp[2, 7], lp[2, 11], lp[7, 13]], atol=1e-4)

    for bad in (types.TensorData(data=[1] * 21, dtype="int64", shape=[7, 3]),
                types.TensorData(data=[600] * 8, dtype="int64", shape=[8, 1]),
                types.TensorData(data=[5], dtype="int64", shape=[8, 3], sparse_crow_indices=[0] + [1] * 8,
                                 sparse_col_indices=[-1])):  # a column outside [0, K), not the last one
        with pytest.raises(ValueError, match="target_prompt_logprobs"):
            sampler.submit(snap, prompt, P(max_tokens=2), target_prompt_logprobs=bad).result(timeout=5)


def test_prompt_alt_tokens_are_draws_with_forward_logprobs(sampler, snap, hf):
    """prompt_alt_tokens_k: k tokens drawn at every prompt position after the first, at the request's temperature,
    with their logprobs under that tempered distribution equal to transformers' forward pass; greedy draws are the
    argmax; the same seed draws the same tokens, another seed others."""
    prompt = prompt_of(170, 10)
    draw = lambda params: sampler.submit(snap, prompt, params, prompt_alt_tokens_k=4).result(  # noqa: E731
        timeout=60).prompt_alt_tokens
    for temperature in (1.0, 0.6):
        alt = draw(P(max_tokens=2, seed=11, temperature=temperature))
        toks, lps = alt.tokens.to_numpy(), alt.logprobs.to_numpy()
        assert toks.shape == lps.shape == (9, 4)
        ref = hf_logprobs(hf, prompt, temperature)  # row i: the distribution over prompt[i + 1]
        np.testing.assert_allclose(lps, np.take_along_axis(ref[:9], toks, axis=1), atol=1e-4)
        assert len(np.unique(toks)) > 9  # draws, not one token repeated
    again = draw(P(max_tokens=2, seed=11, temperature=0.6)).tokens.to_numpy()
    np.testing.assert_array_equal(again, toks)
    assert not np.array_equal(draw(P(max_tokens=2, seed=12, temperature=0.6)).tokens.to_numpy(), toks)
    greedy = draw(P(max_tokens=2, temperature=0.0))
    ref = hf_logprobs(hf, prompt)
    np.testing.assert_array_equal(greedy.tokens.to_numpy(), np.repeat(ref[:9].argmax(-1)[:, None], 4, axis=1))


_EXIT_CHILD = """
import sys
import time
from tinker import types
from tinker_jax.hf.weights import load_decoder
from tinker_jax.sampling import Sampler, snapshot_of
snap = snapshot_of(load_decoder(sys.argv[1]), name="base")
s = Sampler(snap.cfg, max_batch=4, max_seq_len=256, decode_steps=4)
futs = [s.submit(snap, [5, 6, 7], types.SamplingParams(max_tokens=250, seed=i, stop=[])) for i in range(4)]
time.sleep(2)  # the sampler's thread is compiling or decoding when the script ends
print("exiting", flush=True)
"""


def test_a_script_ending_with_samples_in_flight_exits_cleanly(hf_dir, tmp_path):
    """A process that ends while its sampler's thread is decoding exits with status 0: the thread is stopped at
    exit (it used to be torn down inside an XLA call: SIGABRT, "terminate called ...")."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", _EXIT_CHILD, str(hf_dir[0])], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "exiting", (proc.returncode, proc.stderr[-2000:])


def test_prefix_cache_serves_the_next_turn(snap):
    """A conversation's next turn: turn 2's prompt is turn 1's (150 tokens) plus 70 more. With 64-token chunks,
    turn 1 leaves its 9 full KV pages cached; turn 2 gathers them and prefills only the 75 positions after them, in
    2 chunks (prompt_cache_hit_tokens 144), and its tokens and logprobs equal turn 2 on a sampler without the cache.
    A request that scores its prompt, and one of other weights (a LoRA adapter), prefill everything; cached pages
    give way when a row needs them."""
    first = prompt_of(140, 150)
    second = first + prompt_of(141, 70)
    seeded = P(max_tokens=5, seed=3, stop=[])

    def make(cache, kv=None):
        return Sampler(snap.cfg, [EOS], max_batch=4, max_seq_len=320, prefill_lengths=(16, 256),
                       prefill_batches=(1, 4), prefill_chunk=64, prefix_cache=cache, decode_steps=4,
                       kv_cache_tokens=kv).drive(lambda: None)

    s, ref = make(True), make(False)
    try:
        _run_steps(s, [s.submit(snap, first, seeded)])
        chunks = s.stats["prefill_chunks"]
        # 149 positions: 3 chunks (not the 256-token bucket's 4); the whole prompt and each of its 9 full pages
        # cached
        assert chunks == 3 and s.stats_now()["prefix_cache_entries"] == 1 + 9
        (hit,) = _run_steps(s, [s.submit(snap, second, seeded)])
        assert hit.prompt_cache_hit_tokens == 9 * 16 and s.stats["prefill_chunks"] - chunks == 2
        (want,) = _run_steps(ref, [ref.submit(snap, second, seeded)])
        assert want.prompt_cache_hit_tokens == 0 and ref.stats_now()["prefix_cache_entries"] == 0
        assert hit.sequences[0].tokens == want.sequences[0].tokens
        np.testing.assert_allclose(hit.sequences[0].logprobs, want.sequences[0].logprobs, atol=1e-5)
        (scored,) = _run_steps(s, [s.submit(snap, second, seeded, include_prompt_logprobs=True)])
        assert scored.prompt_cache_hit_tokens == 0 and scored.sequences[0].tokens == want.sequences[0].tokens
        lora, _ = _lora_snapshot(snap, 3)
        (other,) = _run_steps(s, [s.submit(lora, second, seeded)])
        assert other.prompt_cache_hit_tokens == 0
    finally:
        s.stop()
        ref.stop()

    # A pool of 16 pages a shard: turn 1 leaves 10 cached (9 full, 1 partly filled); a 200-token request (13 pages)
    # evicts 7 entries to start now, tail first: the whole prompt's (freeing its partly filled page), then its full
    # pages from the last; its first 3 pages stay cached.
    small = make(True, kv=16 * 16)
    try:
        _run_steps(small, [small.submit(snap, first, seeded)])
        assert small.stats_now()["kv_pages_used"] == 10
        (done,) = _run_steps(small, [small.submit(snap, prompt_of(142, 200), seeded)])
        assert len(done.sequences[0].tokens) == 5 and small.stats["prefix_cache_evictions"] == 7
        assert small.stats_now()["prefix_cache_entries"] == 3 + 1 + 12  # and the new prompt's whole and full pages
    finally:
        small.stop()


def test_weights_numbers_are_never_reused():
    """The prefix cache and the weights groups key weights by numbers given in order of first sight: the same
    object keeps its number; a new object gets a new one even where it takes a freed object's id (which CPython
    hands to the next object of the same size at once), so a cache entry of gone weights is never found for new
    ones, on any process."""

    class Weights:
        pass

    number = scheduler._Serials()
    a, b = Weights(), Weights()
    assert (number(a), number(b), number(a)) == (1, 2, 1)
    freed = id(a)
    del a
    c = Weights()  # usually at `freed`
    assert number(c) == 3 and number(b) == 2, (id(c) == freed)
    assert len(number._by_id) == 2  # the freed object's entry went with it


def test_prompts_that_share_cached_pages_prefill_only_the_rest(snap):
    """A shared system prompt (96 tokens: 6 whole pages) before each of 4 questions, then a conversation's next
    turn. The first request leaves its full pages cached; the other 3, submitted together, prefill in one call only
    their positions after the 6 cached pages (a 32-token bucket instead of 128: prefix_cache_prefills 1,
    prompt_cache_hit_tokens 96 each), and list those pages instead of copying them (each copies 1 full page and its
    partly filled one). The next turn (the first prompt, its answer and 10 more tokens) starts after all 7 full
    pages of the first prompt. A batch that mixes such prompts with an unrelated one prefills the rests in one call
    and the other prompt whole in another. Every request's tokens and logprobs equal a sampler's without the
    cache."""
    system = prompt_of(150, 96)
    questions = [system + prompt_of(151 + i, 20) for i in range(4)]
    seeded = [P(max_tokens=6, seed=i, temperature=1.0, stop=[]) for i in range(4)]

    def make(cache):
        return Sampler(snap.cfg, [EOS], max_batch=4, max_seq_len=256, prefill_lengths=(32, 128, 256),
                       prefill_batches=(1, 4), decode_steps=4, prefix_cache=cache).drive(lambda: None)

    s, ref = make(True), make(False)
    try:
        (first,) = _run_steps(s, [s.submit(snap, questions[0], seeded[0])])
        assert first.prompt_cache_hit_tokens == 0 and s.stats["prefill_calls"] == 1
        copied = s.stats["kv_pages_copied"]
        rest = _run_steps(s, [s.submit(snap, q, p) for q, p in zip(questions[1:], seeded[1:])])
        assert s.stats["prefill_calls"] == 2 and s.stats["prefix_cache_prefills"] == 1
        assert [r.prompt_cache_hit_tokens for r in rest] == [96] * 3
        assert s.stats["kv_pages_copied"] - copied == 3 * 2
        turn = questions[0] + first.sequences[0].tokens + prompt_of(160, 10)
        (nxt,) = _run_steps(s, [s.submit(snap, turn, seeded[0])])
        assert nxt.prompt_cache_hit_tokens == 7 * 16 and s.stats["prefix_cache_prefills"] == 2
        # A batch of two more questions and an unrelated prompt: the questions prefill their rests, the other its
        # whole prompt, in a call of its own.
        mixed = [system + prompt_of(165, 20), prompt_of(166, 116), system + prompt_of(167, 20)]
        calls = s.stats["prefill_calls"]
        more = _run_steps(s, [s.submit(snap, q, p) for q, p in zip(mixed, seeded)])
        assert [r.prompt_cache_hit_tokens for r in more] == [96, 0, 96]
        assert s.stats["prefill_calls"] - calls == 2 and s.stats["prefix_cache_prefills"] == 3
        for x, p, got in zip(questions + [turn] + mixed, seeded + seeded[:1] + seeded[:3], [first, *rest, nxt, *more]):
            (want,) = _run_steps(ref, [ref.submit(snap, x, p)])
            assert got.sequences[0].tokens == want.sequences[0].tokens
            np.testing.assert_allclose(got.sequences[0].logprobs, want.sequences[0].logprobs, atol=1e-5)
        assert ref.stats["prefix_cache_prefills"] == 0
    finally:
        s.stop()
        ref.stop()


def test_prompt_logprobs_of_a_shared_prefix_come_from_cached_pages(snap, hf):
    """compute_logprobs of a GRPO group's sequences (a shared 48-token prompt, 3 pages, then each its own 14-token
    answer): submitted together, the first is prefilled whole and scores its prompt; the other 3 wait for its pages,
    then prefill in one call only from their last cached position (whose query scores their first own token), and
    take the shared tokens' logprobs from the cache. A long sequence after the same prompt (chunked, 64 tokens a
    step) does too, its first chunk starting at that position without writing into the shared page. A request that
    also asks for top-k prompt logprobs is prefilled whole. Long sequences of a new prompt sent together wait for
    the first one's chunks instead of each prefilling the prompt, and so do the requests of a GRPO group of one long
    prompt. Every prompt logprob equals transformers' forward."""
    prefix = prompt_of(230, 48)
    seqs = [prefix + prompt_of(231 + i, 14) for i in range(4)] + [prefix + prompt_of(240, 110)]
    s = Sampler(snap.cfg, [EOS], max_batch=4, max_seq_len=256, prefill_lengths=(16, 32, 64, 128, 256),
                prefill_batches=(1, 4), decode_steps=4, prefill_chunk=64).drive(lambda: None)
    one = P(max_tokens=1, seed=1)

    def check(resp, seq):
        lp = hf_logprobs(hf, seq)
        assert resp.prompt_logprobs[0] is None and len(resp.prompt_logprobs) == len(seq)
        np.testing.assert_allclose(resp.prompt_logprobs[1:], [lp[i - 1, seq[i]] for i in range(1, len(seq))],
                                   atol=1e-4)

    try:
        group = _run_steps(s, [s.submit(snap, x, one, include_prompt_logprobs=True) for x in seqs[:4]])
        assert s.stats["prefill_waits_for_batch_mate"] == 3 and s.stats["prefix_cache_prefills"] == 1
        assert [r.prompt_cache_hit_tokens for r in group] == [0, 48, 48, 48]
        (long,) = _run_steps(s, [s.submit(snap, seqs[4], one, include_prompt_logprobs=True)])
        assert long.prompt_cache_hit_tokens == 48 and s.stats["prefill_chunks"] == 2  # positions 47.. in 2 of 64
        hits = s.stats["prefix_cache_hit_tokens"]
        (topk,) = _run_steps(s, [s.submit(snap, seqs[1], one, include_prompt_logprobs=True,
                                          topk_prompt_logprobs=2)])
        assert topk.prompt_cache_hit_tokens == 0 and s.stats["prefix_cache_hit_tokens"] == hits
        # Long sequences after a new 96-token prompt, together: the first is prefilled in chunks, the others wait
        # for it (not each prefilling the prompt at once) and start after its 6 pages.
        longs = [prompt_of(250, 96) + prompt_of(251 + i, 60) for i in range(3)]
        chunks = s.stats["prefill_chunks"]
        together = _run_steps(s, [s.submit(snap, x, one, include_prompt_logprobs=True) for x in longs])
        assert [r.prompt_cache_hit_tokens for r in together] == [0, 96, 96]
        assert s.stats["prefill_waits_for_long_mate"] > 0 and s.stats["prefill_chunks"] - chunks == 3 + 2 * 1
        # Two more after that prompt, now cached: neither waits for the other (what the first writes, the second
        # cannot use), both start after the 6 cached pages.
        waits = s.stats["prefill_waits_for_long_mate"]
        more = [prompt_of(250, 96) + prompt_of(255 + i, 150) for i in range(2)]  # 3 chunks each
        after = _run_steps(s, [s.submit(snap, x, one, include_prompt_logprobs=True) for x in more])
        assert [r.prompt_cache_hit_tokens for r in after] == [96, 96]
        assert s.stats["prefill_waits_for_long_mate"] == waits
        # A GRPO group of one long prompt sent as separate requests: one chunked prefill, the rest from the cache.
        chunks, whole = s.stats["prefill_chunks"], s.stats["prompt_cache_hits"]
        group_of_one = _run_steps(s, [s.submit(snap, prompt_of(260, 150), P(max_tokens=3, seed=i, stop=[]))
                                      for i in range(3)])
        assert s.stats["prefill_chunks"] - chunks == 3 and s.stats["prompt_cache_hits"] - whole == 2
        assert all(len(r.sequences[0].tokens) == 3 for r in group_of_one)
    finally:
        s.stop()
    for resp, seq in zip(group + [long, topk] + together + after, seqs + seqs[1:2] + longs + more):
        check(resp, seq)


def test_requests_that_share_a_new_system_prompt_and_arrive_together_prefill_it_once(snap):
    """4 questions after one 96-token system prompt (6 whole pages) that the cache does not hold, and a copy of the
    first question, submitted together: the first question (and its copy, which shares its prefill row) is prefilled
    whole; the other 3 wait for it (prefill_waits_for_batch_mate 3) and then prefill only their positions after
    its 6 cached pages, together (2 prefill calls, prompt_cache_hit_tokens 0, 0, 96, 96, 96). Every request's
    tokens and logprobs equal a sampler's without the cache, which prefills all 4 prompts whole in one call."""
    system = prompt_of(155, 96)
    questions = [system + prompt_of(156 + i, 20) for i in range(4)]
    questions.insert(1, questions[0])
    seeded = [P(max_tokens=6, seed=i, temperature=1.0, stop=[]) for i in range(5)]

    def make(cache):
        return Sampler(snap.cfg, [EOS], max_batch=8, max_seq_len=256, prefill_lengths=(32, 128, 256),
                       prefill_batches=(1, 4, 8), decode_steps=4, prefix_cache=cache).drive(lambda: None)

    s, ref = make(True), make(False)
    try:
        got = _run_steps(s, [s.submit(snap, q, p) for q, p in zip(questions, seeded)])
        assert [r.prompt_cache_hit_tokens for r in got] == [0, 0, 96, 96, 96]
        assert s.stats["prefill_waits_for_batch_mate"] == 3
        assert s.stats["prefill_calls"] == 2 and s.stats["prefix_cache_prefills"] == 1
        want = _run_steps(ref, [ref.submit(snap, q, p) for q, p in zip(questions, seeded)])
        assert ref.stats["prefill_calls"] == 1 and ref.stats["prefill_waits_for_batch_mate"] == 0
        for a, b in zip(got, want):
            assert a.sequences[0].tokens == b.sequences[0].tokens
            np.testing.assert_allclose(a.sequences[0].logprobs, b.sequences[0].logprobs, atol=1e-5)
    finally:
        s.stop()
        ref.stop()


def test_a_next_turn_finds_the_answer_pages_cached(snap):
    """A finished row leaves the pages its sampled tokens filled cached too: turn 1 is a 40-token prompt (2 full
    pages) answered with 40 tokens (positions 0-78: 4 full pages); turn 2 sends both back with 10 more tokens and
    prefills only the last 24 positions (prompt_cache_hit_tokens 64, not the prompt's 32). Its tokens and logprobs
    equal a sampler's without the cache (decode wrote those pages, a prefill writes them without the cache)."""
    first = prompt_of(170, 40)
    params = P(max_tokens=40, seed=5, temperature=1.0, stop=[])

    def make(cache):
        return Sampler(snap.cfg, [EOS], max_batch=4, max_seq_len=128, prefill_lengths=(32, 128),
                       prefill_batches=(1, 4), decode_steps=8, prefix_cache=cache).drive(lambda: None)

    s, ref = make(True), make(False)
    try:
        (one,) = _run_steps(s, [s.submit(snap, first, params)])
        assert len(one.sequences[0].tokens) == 40
        turn = first + one.sequences[0].tokens + prompt_of(171, 10)
        (two,) = _run_steps(s, [s.submit(snap, turn, P(max_tokens=8, seed=6, temperature=1.0, stop=[]))])
        assert two.prompt_cache_hit_tokens == 4 * 16 and s.stats["prefix_cache_prefills"] == 1
        (want_one,) = _run_steps(ref, [ref.submit(snap, first, params)])
        assert want_one.sequences[0].tokens == one.sequences[0].tokens
        (want,) = _run_steps(ref, [ref.submit(snap, turn, P(max_tokens=8, seed=6, temperature=1.0, stop=[]))])
        assert two.sequences[0].tokens == want.sequences[0].tokens
        np.testing.assert_allclose(two.sequences[0].logprobs, want.sequences[0].logprobs, atol=1e-5)
    finally:
        s.stop()
        ref.stop()


def test_a_random_workload_with_the_prefix_cache_equals_one_without_and_keeps_its_pages_straight(snap):
    """Requests built from 3 shared prefixes (whole pages and not), with random question lengths, num_samples, and
    next turns that send answers back, some asking for their prompt's logprobs too, submitted a few at a time to a
    pool so small that cached pages are evicted and samples wait: every result equals a sampler's without the cache
    (tokens; logprobs and prompt logprobs within 1e-5), the cache
    was used (prompts found whole, prefills that started after cached pages, evictions), and once nothing runs,
    each page's holders are exactly the cache entries that list it (no page lost or freed twice)."""
    rng, scoring = np.random.default_rng(7), np.random.default_rng(8)
    prefixes = [prompt_of(180, 48), prompt_of(181, 37), prompt_of(182, 70)]
    scored_hits = []  # prompt_cache_hit_tokens of the requests that also asked for their prompt's logprobs

    def make(cache):
        return Sampler(snap.cfg, [EOS], max_batch=4, max_seq_len=200, prefill_lengths=(16, 32, 64, 128, 200),
                       prefill_batches=(1, 2, 4), prefill_chunk=64, decode_steps=4, max_num_samples=3,
                       kv_cache_tokens=16 * 22, prefix_cache=cache).drive(lambda: None)

    s, ref = make(True), make(False)
    try:
        done = []  # (prompt, params, result)
        for _ in range(6):
            jobs = []
            for _ in range(int(rng.integers(2, 5))):
                if done and rng.random() < 0.3:  # a next turn: an earlier prompt, its answer, a few more tokens
                    x, _, got = done[int(rng.integers(len(done)))]
                    x = (x + got.sequences[0].tokens + prompt_of(int(rng.integers(1000)), 5))[-120:]
                else:
                    x = prefixes[int(rng.integers(3))] + prompt_of(int(rng.integers(1000)), int(rng.integers(1, 40)))
                    if rng.random() < 0.2 and done:
                        x = done[-1][0]  # a prompt sampled again
                jobs.append((x, P(max_tokens=int(rng.integers(4, 20)), seed=int(rng.integers(100)), temperature=1.0,
                                  stop=[]), int(rng.integers(1, 4))))
            scores = [bool(scoring.random() < 0.5) for _ in jobs]  # (its own stream: the workload's draws stay)
            futs = [s.submit(snap, x, p, num_samples=n, include_prompt_logprobs=sc)
                    for (x, p, n), sc in zip(jobs, scores)]
            for (x, p, n), sc, got in zip(jobs, scores, _run_steps(s, futs, limit=200)):
                (want,) = _run_steps(ref, [ref.submit(snap, x, p, num_samples=n, include_prompt_logprobs=sc)],
                                     limit=200)
                for a, b in zip(got.sequences, want.sequences):
                    assert a.tokens == b.tokens
                    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
                if sc:
                    np.testing.assert_allclose(got.prompt_logprobs[1:], want.prompt_logprobs[1:], atol=1e-5)
                    scored_hits.append(got.prompt_cache_hit_tokens)
                done.append((x, p, got))
        st = s.stats
        # (this seed's workload does both, in a pool of 22 pages; long prompts' chunks take pool pages too, so a
        # smaller pool left no prompt cached whole until it came again)
        assert st["kv_page_waits"] > 0 and st["prompt_cache_hits"] > 0
        assert st["prefix_cache_prefills"] > 0 and st["prefix_cache_evictions"] > 0
        assert st["prefix_cache_hit_tokens"] > 0 and ref.stats["prefix_cache_hit_tokens"] == 0
        assert max(scored_hits) > 0  # some scored prompts took their first tokens' logprobs from cached pages
        _assert_pages_held_only_by_the_cache(s)
    finally:
        s.stop()
        ref.stop()
