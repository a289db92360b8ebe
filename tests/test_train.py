"""The training core end to end through tinker_jax.ServiceClient on the tiny-qwen3 preset:

- loss semantics: returned logprobs == transformers' log_softmax on the same weights, loss:sum == the NumPy
  loss of the returned logprobs, `forward` accumulates nothing, forward_backward_custom == cross_entropy;
- LoRA: alpha 32 (scale 32/rank, checked against torch with the adapters merged into the HF weights),
  train_* flags pick the adapted projections (and the server config's target_modules narrow them), seeded init,
  fp32 trainable state under bfloat16 compute;
- optimizer: gradient accumulation across calls, AdamW (decoupled weight decay, global-norm clipping) against a
  NumPy reference with torch.optim.AdamW semantics;
- compilation: a stream of random batch sizes and lengths compiles a bounded number of programs.

Most clients use LoRA rank 4 and 4 rows x 16 tokens so they share one compiled forward_backward program.
"""

from __future__ import annotations

import copy
import itertools
import re

import jax
import jax.numpy as jnp
import models_util
from models_util import flat, rel
import numpy as np
import pytest
import tinker.types as tt
import torch

import tinker_jax
from tinker_jax.config import EngineConfig
from tinker_jax.models.lora import TINKER_LORA_ALPHA, LoraSpec
from tinker_jax.training import batching
from tinker_jax.training import step as train

PRESET = "tiny-qwen3"
RANK = 4
VOCAB = 512
LENGTHS = (5, 9, 16, 12)  # one [4, 16] bucket
METRIC_KEY = r"^[A-Za-z0-9_./-]+:(sum|mean|max|min|count)$"


# ------------------------------------------------------------------------------------------------ helpers


def datum(tokens, targets, **inputs) -> tt.Datum:
    fields = {"target_tokens": tt.TensorData.from_numpy(np.asarray(targets, np.int64))}
    fields.update({k: tt.TensorData.from_numpy(np.asarray(v, np.float32)) for k, v in inputs.items()})
    return tt.Datum(model_input=tt.ModelInput.from_ints([int(t) for t in tokens]), loss_fn_inputs=fields)


def random_data(seed: int, lengths=LENGTHS, signed_weights: bool = False) -> list[tt.Datum]:
    """Random tokens; weights in [0.5, 1.5] (or N(0,1) with a few exact zeros when signed_weights)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        toks = rng.integers(0, VOCAB, n + 1)
        w = rng.normal(size=n) if signed_weights else rng.uniform(0.5, 1.5, n)
        if signed_weights:
            w[rng.random(n) < 0.2] = 0.0
        out.append(datum(toks[:-1], toks[1:], weights=w))
    return out


def inputs_of(d: tt.Datum):
    toks = [t for c in d.model_input.chunks for t in c.tokens]
    return np.asarray(toks), {k: v.to_numpy() for k, v in d.loss_fn_inputs.items()}


def state(tc) -> dict:
    """Host copies of the run's adapter, gradient accumulator and Adam state (engine.run_state)."""
    return tc.engine.run_state(tc.model_id)



def params(tc):
    return flat(state(tc)["weights"])


def logprobs(out) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].to_numpy()) for o in out.loss_fn_outputs]



def torch_logprobs(hf, tokens, targets) -> np.ndarray:
    """log_softmax(logits)[targets] from a transformers model (fp32, one unpadded sequence)."""
    with torch.no_grad():
        logits = hf(torch.tensor(np.asarray(tokens)[None], dtype=torch.long)).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        return lp[torch.arange(len(targets)), torch.tensor(np.asarray(targets), dtype=torch.long)].numpy()


def merged_hf(p: dict[str, np.ndarray], scale: float):
    """The transformers reference with LoRA adapters merged: W_hf += scale * (A @ B).T per layer, and the tied
    unembedding's adapter added to lm_head's output (h @ A @ B * scale)."""
    hf = copy.deepcopy(models_util.hf_model(PRESET))
    with torch.no_grad():
        for l, layer in enumerate(hf.model.layers):
            for mod, names in ((layer.self_attn, "qkvo"), (layer.mlp, ("gate", "up", "down"))):
                for name in names:
                    a, b = p[f"['{name}']['a']"][l], p[f"['{name}']['b']"][l]
                    getattr(mod, f"{name}_proj").weight += torch.from_numpy(scale * (a @ b).T)
    a, b = (torch.from_numpy(p[f"['unembed']['{k}']"]) for k in ("a", "b"))
    hf.lm_head.register_forward_hook(lambda mod, inp, out: out + scale * (inp[0] @ a) @ b)
    return hf


def lora_roles(targets) -> dict[str, int]:
    """role -> number of adapted projections."""
    from tinker_jax.models.lora import BY_NAME

    counts = {"attn": 0, "mlp": 0, "unembed": 0}
    for n in targets:
        counts[BY_NAME[n].role] += 1
    return counts


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model_dir():
    return models_util.tiny_model_dir(PRESET)


@pytest.fixture(scope="module")
def svc(model_dir, tmp_path_factory):
    s = tinker_jax.ServiceClient(data_dir=tmp_path_factory.mktemp("train_data"),
                                 config=EngineConfig(models={"tiny": str(model_dir)}))
    yield s
    s.close()


def client(svc, seed: int, **kw):
    return svc.create_lora_training_client("tiny", rank=RANK, seed=seed, **kw)


# ------------------------------------------------------------------------------------------------ loss semantics


def test_logprobs_match_transformers_and_loss_sum_matches_numpy(svc):
    tc = client(svc, seed=0)  # fresh adapter (B = 0): the model is exactly the base model
    data = random_data(0, signed_weights=True)
    out = tc.forward_backward(data, "cross_entropy").result()
    lps = logprobs(out)
    hf = models_util.hf_model(PRESET)
    expected_loss = 0.0
    for d, lp in zip(data, lps):
        toks, x = inputs_of(d)
        assert lp.shape == x["target_tokens"].shape  # aligned with target_tokens, padding stripped
        np.testing.assert_allclose(lp, torch_logprobs(hf, toks, x["target_tokens"]), rtol=0, atol=1e-4)
        expected_loss += -np.sum(lp.astype(np.float64) * x["weights"])
    assert out.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5, abs=1e-4)
    assert all(re.match(METRIC_KEY, k) for k in out.metrics), out.metrics

    # importance_sampling (through forward: same loss code, a cheaper program to compile).
    rng = np.random.default_rng(1)
    is_data = []
    for d, lp in zip(data, lps):
        toks, x = inputs_of(d)
        is_data.append(datum(toks, x["target_tokens"], logprobs=lp + rng.normal(0, 0.3, lp.shape),
                             advantages=rng.normal(size=lp.shape)))
    out = tc.forward(is_data, "importance_sampling").result()
    expected = 0.0
    for d, lp in zip(is_data, logprobs(out)):
        _, x = inputs_of(d)
        expected += -np.sum(np.exp(lp.astype(np.float64) - x["logprobs"]) * x["advantages"])
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5, abs=1e-4)
    for a, b in zip(logprobs(out), lps):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_forward_accumulates_no_gradient(svc):
    tc = client(svc, seed=2)
    data = random_data(2)
    before = params(tc)
    fwd = tc.forward(data, "cross_entropy").result()
    st = state(tc)
    assert st["pending"] == 0 and all(not np.any(g) for g in flat(st["grads"]).values())
    # Adam with zero gradients and weight_decay 0 moves nothing: a forward that leaked gradient would.
    tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
    after = params(tc)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    fb = tc.forward_backward(data, "cross_entropy").result()
    for a, b in zip(logprobs(fwd), logprobs(fb)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert fwd.metrics["loss:sum"] == pytest.approx(fb.metrics["loss:sum"], rel=1e-6)
    tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
    assert any(not np.array_equal(params(tc)[k], before[k]) for k in before)  # the contrast case


def test_custom_loss_matches_cross_entropy(svc):
    data = random_data(3, signed_weights=True)
    custom_tc, ce_tc = client(svc, seed=3), client(svc, seed=3)

    def weighted_nll(ds, lps):
        loss = sum((-lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(ds, lps))
        return loss, {"weighted_tokens:sum": float(sum(d.loss_fn_inputs["weights"].to_torch().abs().sum()
                                                       for d in ds))}

    cu = custom_tc.forward_backward_custom(data, weighted_nll).result()
    ce = ce_tc.forward_backward(data, "cross_entropy").result()
    assert cu.metrics["loss:sum"] == pytest.approx(ce.metrics["loss:sum"], rel=1e-5)
    assert all(re.match(METRIC_KEY, k) for k in cu.metrics), cu.metrics
    for a, b in zip(logprobs(cu), logprobs(ce)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([v.ravel() for v in flat(state(custom_tc)["grads"]).values()]),
                               np.concatenate([v.ravel() for v in flat(state(ce_tc)["grads"]).values()]),
                               rtol=1e-5, atol=1e-6)
    adam = tt.AdamParams(learning_rate=1e-2)
    custom_tc.optim_step(adam).result()
    ce_tc.optim_step(adam).result()
    a, b = params(custom_tc), params(ce_tc)
    assert rel(a, b) < 1e-6

    # A non-linear custom loss, sum(lp^2): its gradient 2*lp is the cross_entropy weight -2*lp.
    sq_tc, ref_tc = client(svc, seed=4), client(svc, seed=4)
    sq = sq_tc.forward_backward_custom(data, lambda ds, lps: (sum((lp ** 2).sum() for lp in lps), {})).result()
    lps = logprobs(ref_tc.forward(data, "cross_entropy").result())
    assert sq.metrics["loss:sum"] == pytest.approx(sum(float(np.sum(lp.astype(np.float64) ** 2)) for lp in lps),
                                                   rel=1e-5)
    ref_data = []
    for d, lp in zip(data, lps):
        toks, x = inputs_of(d)
        ref_data.append(datum(toks, x["target_tokens"], weights=-2 * lp))
    ref_tc.forward_backward(ref_data, "cross_entropy").result()
    np.testing.assert_allclose(np.concatenate([v.ravel() for v in flat(state(sq_tc)["grads"]).values()]),
                               np.concatenate([v.ravel() for v in flat(state(ref_tc)["grads"]).values()]),
                               rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ LoRA


def test_lora_scale_is_alpha_32_over_rank_against_merged_torch(svc):
    assert TINKER_LORA_ALPHA == 32
    tc = client(svc, seed=5)
    assert state(tc)["spec"].scale == 32 / RANK and state(tc)["spec"].alpha == 32
    data = random_data(5)
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(tt.AdamParams(learning_rate=0.05)).result()  # every B becomes non-zero
    p = params(tc)
    assert all(np.any(v) for k, v in p.items() if k.endswith("['b']"))
    lps = logprobs(tc.forward(data, "cross_entropy").result())
    right, wrong = merged_hf(p, 32 / RANK), merged_hf(p, 16 / RANK)  # alpha 32 vs e.g. alpha 16
    worst_right = worst_wrong = 0.0
    for d, lp in zip(data, lps):
        toks, x = inputs_of(d)
        worst_right = max(worst_right, np.abs(lp - torch_logprobs(right, toks, x["target_tokens"])).max())
        worst_wrong = max(worst_wrong, np.abs(lp - torch_logprobs(wrong, toks, x["target_tokens"])).max())
    assert worst_right < 2e-4, worst_right
    assert worst_wrong > 100 * worst_right  # the comparison can tell the scales apart


def test_lora_flags_select_projections(svc, model_dir, tmp_path):
    for attn, mlp, unembed in itertools.product((False, True), repeat=3):
        if not (attn or mlp or unembed):
            with pytest.raises(ValueError, match="at least one"):
                LoraSpec.from_flags(RANK, train_attn=attn, train_mlp=mlp, train_unembed=unembed)
            continue
        spec = LoraSpec.from_flags(RANK, train_attn=attn, train_mlp=mlp, train_unembed=unembed)
        assert lora_roles(spec.targets) == {"attn": 4 * attn, "mlp": 3 * mlp, "unembed": 1 * unembed}

    # Through the client: the run's trainable set is exactly the selected adapters.
    for kw, expected in (({}, {"attn": 4, "mlp": 3, "unembed": 1}),
                         (dict(train_attn=False, train_unembed=False), {"attn": 0, "mlp": 3, "unembed": 0})):
        st = state(client(svc, seed=0, **kw))
        assert lora_roles(st["spec"].targets) == expected
        keys = set(flat(st["weights"]))
        assert len(keys) == 2 * sum(expected.values())
        assert all(k.endswith(("['a']", "['b']")) for k in keys)
        assert any("['gate']" in k for k in keys)
        assert any("['q']" in k for k in keys) == bool(expected["attn"])
        assert any("unembed" in k for k in keys) == bool(expected["unembed"])
    with pytest.raises(ValueError, match="at least one"):
        client(svc, seed=0, train_attn=False, train_mlp=False, train_unembed=False)

    # The server config narrows the targets (down to single projections) and sets alpha.
    cfg = EngineConfig.from_dict({"data_dir": str(tmp_path), "models": {"tiny": str(model_dir)},
                                  "compile_cache": False,
                                  "lora": {"alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]}})
    with tinker_jax.ServiceClient(config=cfg) as qv:
        tc = qv.create_lora_training_client("tiny", rank=RANK, seed=1)
        st = state(tc)
        assert st["spec"].targets == ("q", "v", "unembed") and st["spec"].scale == 8 / RANK
        assert {k.split("]")[0] + "]" for k in flat(st["weights"])} == {"['q']", "['v']", "['unembed']"}
        data = random_data(1)
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(tt.AdamParams(learning_rate=0.05)).result()
        st = state(tc)
        assert all(np.any(v) for k, v in flat(st["weights"]).items() if k.endswith("['b']"))
        lps = logprobs(tc.forward(data, "cross_entropy").result())
        # The adapted model equals transformers with the q/v/lm_head adapters merged at scale alpha/rank = 2.
        p = flat(st["weights"])
        hf = copy.deepcopy(models_util.hf_model(PRESET))
        with torch.no_grad():
            for l, layer in enumerate(hf.model.layers):
                for name in "qv":
                    a, b = p[f"['{name}']['a']"][l], p[f"['{name}']['b']"][l]
                    getattr(layer.self_attn, f"{name}_proj").weight += torch.from_numpy(2.0 * (a @ b).T)
        a, b = (torch.from_numpy(p[f"['unembed']['{k}']"]) for k in ("a", "b"))
        hf.lm_head.register_forward_hook(lambda mod, inp, out: out + 2.0 * (inp[0] @ a) @ b)
        for d, lp in zip(data, lps):
            toks, x = inputs_of(d)
            np.testing.assert_allclose(lp, torch_logprobs(hf, toks, x["target_tokens"]), atol=2e-4)
        with pytest.raises(ValueError, match="at least one"):  # attn off leaves nothing of q, v, lm_head but lm_head
            qv.create_lora_training_client("tiny", rank=RANK, train_attn=False, train_unembed=False)


def test_adapter_init_is_seeded(svc):
    a, a2, b = (params(client(svc, seed=s)) for s in (11, 11, 12))
    for k in a:
        np.testing.assert_array_equal(a[k], a2[k], err_msg=k)
        if k.endswith("['b']"):
            assert not np.any(a[k]) and not np.any(b[k])  # B = 0: a fresh adapter is a no-op
        else:
            assert not np.array_equal(a[k], b[k]), k
            assert np.std(a[k]) > 0
            if a[k].ndim == 3:  # stacked layers get independent draws
                assert not np.array_equal(a[k][0], a[k][1]), k


def test_bfloat16_compute_keeps_trainable_grads_and_moments_fp32(model_dir, tmp_path, svc):
    data = random_data(6)
    ref = client(svc, seed=6).forward_backward(data, "cross_entropy").result()
    with tinker_jax.ServiceClient(config=EngineConfig(data_dir=tmp_path, models={"tiny": str(model_dir)},
                                                      dtype="bfloat16")) as bf:
        tc = bf.create_lora_training_client("tiny", rank=RANK, seed=6)
        assert state(tc)["compute_dtype"] == jnp.bfloat16
        base = bf.engine._workers["tiny"].base  # the shared base weights are stored in bf16
        assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype(jnp.bfloat16)}
        out = tc.forward_backward(data, "cross_entropy").result()
        # bf16 compute really ran (close to, but not the same as, fp32)...
        assert out.metrics["loss:sum"] != ref.metrics["loss:sum"]
        assert out.metrics["loss:sum"] == pytest.approx(ref.metrics["loss:sum"], rel=3e-2)
        st = state(tc)
        assert any(np.any(g) for g in flat(st["grads"]).values())
        tc.optim_step(tt.AdamParams(learning_rate=1e-3)).result()
        st = state(tc)
        # ... while the adapters, the gradient accumulator and Adam's moments stay float32.
        for name in ("weights", "grads", "mu", "nu"):
            arrays = jax.tree.leaves(st[name])
            assert arrays and {x.dtype for x in arrays} == {np.dtype(np.float32)}, name
        assert any(np.any(m) for m in jax.tree.leaves(st["mu"]))


# ------------------------------------------------------------------------------------------------ optimizer


def test_accumulation_over_calls_equals_one_big_batch(svc):
    data = random_data(7, lengths=(5, 9, 16, 12, 3, 16, 7, 11))
    one, two = client(svc, seed=7), client(svc, seed=7)
    big = one.forward_backward(data, "cross_entropy").result()
    first = two.forward_backward(data[:4], "cross_entropy").result()
    second = two.forward_backward(data[4:], "cross_entropy").result()
    assert state(two)["pending"] == 2
    assert big.metrics["loss:sum"] == pytest.approx(first.metrics["loss:sum"] + second.metrics["loss:sum"],
                                                    rel=1e-6)
    for a, b in zip(logprobs(big), logprobs(first) + logprobs(second)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert rel(flat(state(two)["grads"]), flat(state(one)["grads"])) < 1e-6
    adam = tt.AdamParams(learning_rate=1e-2, weight_decay=0.01)
    one.optim_step(adam).result()
    two.optim_step(adam).result()
    a, b = params(one), params(two)
    assert rel(b, a) < 1e-6
    # The accumulator was consumed: a second step from zero gradients is the same for both and not a repeat.
    assert not any(np.any(g) for g in flat(state(one)["grads"]).values()) and state(one)["pending"] == 0


def numpy_adamw(p, g, m, v, t, *, lr, b1, b2, eps, wd, clip):
    """torch.optim.AdamW (decoupled decay) after torch.nn.utils.clip_grad_norm_ (global norm), in float64."""
    gnorm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g.values()))
    factor = clip / gnorm if clip > 0 and gnorm > clip else 1.0
    out, m2, v2 = {}, {}, {}
    for k in p:
        gk = g[k].astype(np.float64) * factor
        m2[k] = b1 * m[k] + (1 - b1) * gk
        v2[k] = b2 * v[k] + (1 - b2) * gk * gk
        pk = p[k].astype(np.float64) * (1 - lr * wd)
        denom = np.sqrt(v2[k]) / np.sqrt(1 - b2 ** t) + eps
        out[k] = pk - (lr / (1 - b1 ** t)) * m2[k] / denom
    return out, m2, v2, gnorm


def test_optim_step_matches_numpy_adamw(svc):
    tc = client(svc, seed=8)
    p = params(tc)
    m = {k: np.zeros_like(x, np.float64) for k, x in p.items()}
    v = {k: np.zeros_like(x, np.float64) for k, x in p.items()}
    steps = [  # step 2 changes every hyperparameter (and turns clipping on) without recompiling
        dict(lr=3e-3, b1=0.8, b2=0.9, eps=1e-5, wd=0.1, clip=0.0),
        dict(lr=1e-3, b1=0.7, b2=0.99, eps=1e-4, wd=0.3, clip=None),
    ]
    compiled = None
    for t, hp in enumerate(steps, start=1):
        tc.forward_backward(random_data(100 + t), "cross_entropy").result()
        g = flat(state(tc)["grads"])
        gnorm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g.values()))
        if hp["clip"] is None:
            hp["clip"] = 0.25 * gnorm  # clipping active
        out = tc.optim_step(tt.AdamParams(learning_rate=hp["lr"], beta1=hp["b1"], beta2=hp["b2"], eps=hp["eps"],
                                          weight_decay=hp["wd"], grad_clip_norm=hp["clip"])).result()
        if compiled is None:
            compiled = train.compile_count()
        assert train.compile_count() == compiled
        assert out.metrics["grad_norm:mean"] == pytest.approx(gnorm, rel=1e-5)
        m0, v0 = m, v
        expected, m, v, _ = numpy_adamw(p, g, m0, v0, t, **hp)
        got = params(tc)
        for k in expected:
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=2e-8, err_msg=f"step {t} {k}")
        # The reference is sharp enough to see each hyperparameter: getting any one wrong is a visible error.
        # (Step 1 cannot see the betas, which bias correction cancels, nor clipping, which Adam's first step
        # is invariant to up to eps; step 2 sees both.)
        knobs = [("wd", 0.0), ("eps", 1e-12), ("lr", hp["lr"] * 1.01)]
        if t == 2:
            knobs += [("b1", 0.9), ("b2", 0.95), ("clip", 0.0)]
        for knob, other in knobs:
            alt, *_ = numpy_adamw(p, g, m0, v0, t, **{**hp, knob: other})
            assert max(np.abs(got[k] - alt[k]).max() for k in alt) > 1e-6, (t, knob)
        p = got


# ------------------------------------------------------------------------------------------------ compilation


def _pow2(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, int(n - 1).bit_length()))


def test_random_shapes_compile_a_bounded_number_of_programs(svc):
    """20 steps of random batch size (1..12) and lengths (1..300), with a learning-rate schedule.

    Bound: one forward_backward program per distinct micro-batch shape actually used (rows and lengths round up
    to powers of two, lengths to >= 16; a batch may split into micro-batches by length) plus at most one
    optim_step program (hyperparameters are traced, so the schedule never recompiles). The shapes come from a
    fixed grid (here <= 5 row buckets x 6 length buckets = 30) whatever the number of steps; shape-exact
    compilation would need a program per micro-batch.
    """
    tc = client(svc, seed=9)
    rng = np.random.default_rng(23)
    before = train.compile_count()
    shapes, n_micro = set(), 0
    for step in range(20):
        b = int(rng.integers(1, 13))
        lens = rng.integers(1, 301, b)
        data = []
        for n in lens:
            toks = rng.integers(0, VOCAB, n + 1)
            data.append(datum(toks[:-1], toks[1:]))
        out = tc.forward_backward(data, "cross_entropy").result()
        assert [len(lp) for lp in logprobs(out)] == list(lens)  # request order, whatever the grouping
        assert np.isfinite(out.metrics["loss:sum"])
        tc.optim_step(tt.AdamParams(learning_rate=1e-3 / (1 + step))).result()
        rows = batching.validate(data, "cross_entropy", vocab_size=VOCAB, max_len=4096)
        micro = batching.plan([batching.Part(rows, RANK, 1)], 8192)
        for mb in micro:
            B, T = mb.tokens.shape
            assert B == _pow2(B, 1) and T == _pow2(T, 16) and B * T <= 8192
        shapes.update(mb.tokens.shape for mb in micro)
        n_micro += len(micro)
    new = train.compile_count() - before
    assert len(shapes) <= 30 and len(shapes) + 1 < n_micro  # programs are reused across steps
    assert new <= len(shapes) + 1, (new, sorted(shapes))


def test_length_groups_cut_padding_and_keep_every_datum():
    """Datums are grouped longest first; short datums leave a long one's micro-batch when that saves padding."""
    from tinker_jax.training.batching import SPLIT_SAVING_TOKENS

    def length_groups(lens, budget):
        rows = batching.validate([datum(np.zeros(n, int), np.zeros(n, int)) for n in lens], "cross_entropy",
                                 vocab_size=VOCAB, max_len=4096)
        return [(mb.shape[1], [d for _, d, _, _ in mb.rows]) for mb in batching.plan([batching.Part(rows, 4, 1)],
                                                                                      budget)]

    groups = length_groups([300] + [30] * 11, 8192)
    assert [(T, len(i)) for T, i in groups] == [(512, 1), (32, 11)]  # 11 x 480 padded tokens saved
    rng = np.random.default_rng(0)
    for _ in range(50):
        lens = rng.integers(1, 1500, int(rng.integers(1, 80))).tolist()
        groups = length_groups(lens, 8192)
        assert sorted(i for _, idx in groups for i in idx) == list(range(len(lens)))  # each datum exactly once
        for T, idx in groups:
            assert max(lens[i] for i in idx) <= T == _pow2(max(lens[i] for i in idx), 16)
            assert _pow2(len(idx), 1) * T <= max(8192, T)
        padded = sum(_pow2(len(idx), 1) * T for T, idx in groups)
        T0 = _pow2(max(lens), 16)
        per = max(1, 8192 // T0)
        one_shape = -(-len(lens) // per) * _pow2(min(len(lens), per), 1) * T0  # every micro-batch at the max
        assert padded <= one_shape
    assert SPLIT_SAVING_TOKENS > 0


# ------------------------------------------------------------------------------------------------ memory savers


def _loss_fn(svc, tc, data):
    """The run's loss as a function of its (compact) adapter, with the run's adapter moved off zero, on one
    micro-batch of `data`: what the engine's step differentiates."""
    w = svc.engine._workers["tiny"]
    st = state(tc)
    pool = w.pools[RANK]
    spec = st["spec"]
    (mb,) = batching.plan([batching.Part(batching.validate(data, "cross_entropy", vocab_size=512, max_len=512),
                                         RANK, st["slot"])], 4096)
    db = train.device_batch(mb.arrays())
    weights = (train.take_slots(pool.weights, db["lora"][0]["active"]),)
    weights = jax.tree.map(lambda x: x + 0.01, weights)  # non-zero adapters: real gradients
    scales = (jnp.take(pool.scale, db["lora"][0]["active"], axis=0),)
    assert spec.scale == 32 / RANK

    def run(remat=False, attention="einsum"):
        f = lambda wt: train._lora_loss(wt, scales, w.base, w.graphdef, db, mb.layout, remat, attention)
        (loss, (_, _, lp)), g = jax.value_and_grad(f, has_aux=True)(weights)
        return float(loss), np.asarray(lp), flat(g)

    return mb, run


def test_chunked_unembedding_and_remat_keep_values_and_gradients(svc, monkeypatch):
    """Logprobs unembedded in small chunks, and per-layer rematerialisation, change memory, not results:
    same logprobs and same loss gradient as one whole-batch unembedding without remat."""
    mb, run = _loss_fn(svc, client(svc, seed=5), random_data(3))
    n = mb.tokens.size
    monkeypatch.setattr(train, "LOGIT_CHUNK", n)
    ref_loss, ref_lp, ref_g = run()  # one chunk: the whole [B,T,V] at once
    for chunk, remat in ((16, False), (n, True), (32, True), (8, False)):  # 8 < T: chunks are pieces of rows
        monkeypatch.setattr(train, "LOGIT_CHUNK", chunk)
        loss, lp, g = run(remat)
        np.testing.assert_allclose(lp, ref_lp, rtol=0, atol=1e-5)
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert rel(g, ref_g) < 1e-5


def test_seeds_beyond_int32_initialise_adapters(svc):
    """Any non-negative 64-bit seed works (the SDK passes user seeds through) and seeds differ."""
    a = flat(state(client(svc, seed=2**40))["weights"])
    b = flat(state(client(svc, seed=0))["weights"])
    assert any(not np.array_equal(a[k], b[k]) for k in a if k.endswith("['a']"))


def test_fused_attention_path_equals_einsum_on_right_padded_rows(svc):
    """attention="xla" (jax.nn.dot_product_attention, causal only: the path cuDNN takes on a GPU) gives the
    einsum path's logprobs and gradients on rows of different lengths, right-padded as batching pads them."""
    data = random_data(4)
    mb, run = _loss_fn(svc, client(svc, seed=6), data)
    assert len({len(d.model_input.chunks[0].tokens) for d in data}) > 1 and mb.mask.min() == 0  # real padding
    ref_loss, ref_lp, ref_g = run(attention="einsum")
    loss, lp, g = run(attention="xla")
    np.testing.assert_allclose(lp * mb.mask, ref_lp * mb.mask, rtol=0, atol=1e-5)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert rel(g, ref_g) < 1e-5
    with pytest.raises(ValueError, match="attention"):
        run(attention="flash")


def test_attention_config_resolves_per_backend(tmp_path):
    from tinker_jax.config import EngineConfig
    from tinker_jax.engine import Engine
    from tinker_jax.models.decoder import probe_attention

    assert EngineConfig().training_attention("cpu") == "einsum"
    assert EngineConfig(dtype="bfloat16").training_attention("gpu") == "cudnn"
    assert EngineConfig(dtype="float32").training_attention("gpu") == "einsum"
    assert EngineConfig(attention="xla").training_attention("gpu") == "xla"
    with pytest.raises(ValueError, match="config.attention"):
        EngineConfig.from_dict({"attention": "flash"})
    with pytest.raises(ValueError, match="cudnn needs a GPU"):  # asked for explicitly: refused at start
        Engine(EngineConfig(data_dir=tmp_path, attention="cudnn", compile_cache=False))
    assert probe_attention("xla", 4, 2, 16) is None
    if jax.default_backend() == "cpu":
        assert "cuDNN" in probe_attention("cudnn", 4, 2, 16)  # what makes `auto` fall back to einsum
