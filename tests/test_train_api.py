"""The direct Python API (tinker_jax.ServiceClient / TrainingClient) against the official SDK's surface, and
input validation: every bad request fails through its future with a ValueError naming the datum and field,
and leaves the client (and its accumulated gradient) usable.

All clients here use the tiny-qwen3 init-model preset, LoRA rank 4 and batches of 4 rows x 16 tokens, so the
whole file compiles one forward_backward, one forward and one optim_step program.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import time

import jax
import models_util
from models_util import flat
import numpy as np
import pytest
import tinker
import tinker.types as tt

import tinker_jax
from tinker_jax.config import EngineConfig

PRESET = "tiny-qwen3"
RANK = 4
METRIC_KEY = re.compile(r"^[A-Za-z0-9_./-]+:(sum|mean|max|min|count)$")


# ------------------------------------------------------------------------------------------------ helpers


def datum(tokens, targets, **inputs) -> tt.Datum:
    fields = {"target_tokens": tt.TensorData.from_numpy(np.asarray(targets, np.int64))}
    fields.update({k: tt.TensorData.from_numpy(np.asarray(v, np.float32)) for k, v in inputs.items()})
    return tt.Datum(model_input=tt.ModelInput.from_ints([int(t) for t in tokens]), loss_fn_inputs=fields)


def random_data(seed: int, lengths=(5, 9, 16, 12), vocab: int = 512, **const_inputs) -> list[tt.Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        toks = rng.integers(0, vocab, n + 1)
        out.append(datum(toks[:-1], toks[1:], weights=rng.uniform(0.5, 1.5, n),
                         **{k: np.full(n, v, np.float32) for k, v in const_inputs.items()}))
    return out


def params(tc) -> dict[str, np.ndarray]:
    """The client's trainable weights as private numpy copies, keyed by path."""
    st = tc.engine.run_state(tc.model_id)
    return {jax.tree_util.keystr(p): np.array(x, copy=True)
            for p, x in jax.tree_util.tree_leaves_with_path(st["weights"])}


def assert_params_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def logprobs(out: tt.ForwardBackwardOutput) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"].to_numpy()) for o in out.loss_fn_outputs]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model_dir():
    return models_util.tiny_model_dir(PRESET)


@pytest.fixture(scope="module")
def svc(model_dir, tmp_path_factory):
    s = tinker_jax.ServiceClient(data_dir=tmp_path_factory.mktemp("api_data"),
                                 config=EngineConfig(models={"tiny": str(model_dir)}))
    yield s
    s.close()


# ------------------------------------------------------------------------------------------------ API surface

# Methods the issue names, with every parameter the official SDK accepts.
SDK_METHODS = {
    tinker.ServiceClient: (tinker_jax.ServiceClient, [
        "create_lora_training_client", "create_lora_training_client_async",
        "create_training_client_from_state", "create_training_client_from_state_async",
        "create_training_client_from_state_with_optimizer", "create_training_client_from_state_with_optimizer_async",
        "get_server_capabilities", "get_server_capabilities_async", "create_sampling_client",
        "create_sampling_client_async", "close"]),
    tinker.TrainingClient: (tinker_jax.TrainingClient, [
        "forward", "forward_backward", "forward_backward_custom", "optim_step", "save_state", "load_state",
        "load_state_with_optimizer", "save_weights_for_sampler", "get_info", "get_tokenizer",
        "forward_async", "forward_backward_async", "forward_backward_custom_async", "optim_step_async",
        "save_state_async", "load_state_async", "load_state_with_optimizer_async",
        "save_weights_for_sampler_async", "get_info_async", "save_weights_external", "save_weights_external_async",
        "save_weights_and_get_sampling_client", "save_weights_and_get_sampling_client_async",
        "create_sampling_client", "create_sampling_client_async"]),
    tinker.SamplingClient: (tinker_jax.SamplingClient, [
        "sample", "sample_async", "compute_logprobs", "compute_logprobs_async", "get_base_model", "get_tokenizer"]),
    tinker.RestClient: (tinker_jax.RestClient, [
        "get_training_run", "get_training_run_by_tinker_path", "get_weights_info_by_tinker_path",
        "list_training_runs", "list_checkpoints", "list_user_checkpoints", "get_external_weights_urls",
        "delete_checkpoint", "delete_checkpoint_from_tinker_path", "publish_checkpoint_from_tinker_path",
        "unpublish_checkpoint_from_tinker_path", "set_checkpoint_ttl_from_tinker_path", "copy_weights",
        "get_training_run_async", "get_training_run_by_tinker_path_async", "list_training_runs_async",
        "list_checkpoints_async", "list_user_checkpoints_async", "get_external_weights_urls_async",
        "delete_checkpoint_async", "delete_checkpoint_from_tinker_path_async",
        "publish_checkpoint_from_tinker_path_async", "unpublish_checkpoint_from_tinker_path_async",
        "set_checkpoint_ttl_from_tinker_path_async", "copy_weights_async"]),
}


@pytest.mark.parametrize("sdk_cls", list(SDK_METHODS), ids=lambda c: c.__name__)
def test_method_signatures_accept_every_sdk_parameter(sdk_cls):
    ours_cls, names = SDK_METHODS[sdk_cls]
    for name in names:
        sdk_fn, ours_fn = getattr(sdk_cls, name), getattr(ours_cls, name, None)
        assert ours_fn is not None, f"{ours_cls.__name__}.{name} is missing"
        assert inspect.iscoroutinefunction(ours_fn) == name.endswith("_async"), name
        ours = inspect.signature(ours_fn).parameters
        if any(p.kind == p.VAR_KEYWORD for p in ours.values()) and \
                any(p.kind == p.VAR_POSITIONAL for p in ours.values()):
            continue  # (*a, **k) forwarding twin: checked through its sync method
        sdk = inspect.signature(sdk_fn).parameters
        missing = [p for p in sdk if p not in ours]
        assert not missing, f"{ours_cls.__name__}.{name} lacks SDK parameters {missing}"
        # Positional order of the SDK's leading parameters is kept (scripts pass them positionally).
        sdk_pos = [p for p, v in sdk.items() if v.kind == v.POSITIONAL_OR_KEYWORD]
        ours_pos = [p for p, v in ours.items() if v.kind == v.POSITIONAL_OR_KEYWORD]
        assert ours_pos[:len(sdk_pos)] == sdk_pos, f"{name}: {ours_pos} vs SDK {sdk_pos}"


def test_sync_api_round_trip(svc, model_dir):
    caps = svc.get_server_capabilities()
    assert isinstance(caps, tt.GetServerCapabilitiesResponse)
    assert "tiny" in [m.model_name for m in caps.supported_models]

    tc = svc.create_lora_training_client("tiny", rank=RANK, seed=0, train_mlp=True, train_attn=True,
                                         train_unembed=True)
    assert isinstance(tc, tinker_jax.TrainingClient) and tc.result() is tc  # SDK-style creation future

    info = tc.get_info()
    assert isinstance(info, tt.GetInfoResponse)
    assert (info.model_id, info.model_name, info.is_lora, info.lora_rank) == (tc.model_id, "tiny", True, RANK)
    assert info.model_data.arch == "Qwen3ForCausalLM"

    tok = tc.get_tokenizer()
    ids = tok.encode("hello world, the quick brown fox")
    assert ids and all(0 <= i < 512 for i in ids)
    assert tok.decode(ids) == "hello world, the quick brown fox"

    data = random_data(0)
    fut = tc.forward(data, "cross_entropy")
    assert isinstance(fut, tinker_jax.APIFuture)
    fwd = fut.result()
    assert isinstance(fwd, tt.ForwardBackwardOutput)
    assert [len(lp) for lp in logprobs(fwd)] == [5, 9, 16, 12]
    assert all(METRIC_KEY.match(k) for k in fwd.metrics), fwd.metrics

    fb = tc.forward_backward(data, "cross_entropy").result()
    assert isinstance(fb, tt.ForwardBackwardOutput)
    for a, b in zip(logprobs(fwd), logprobs(fb)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert fb.metrics["loss:sum"] == pytest.approx(fwd.metrics["loss:sum"], rel=1e-6)

    def custom(ds, lps):
        loss = sum((-lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(ds, lps))
        return loss, {"tokens:sum": float(sum(len(lp) for lp in lps))}

    cu = tc.forward_backward_custom(data, custom).result()
    assert isinstance(cu, tt.ForwardBackwardOutput)
    assert cu.metrics["loss:sum"] == pytest.approx(fb.metrics["loss:sum"], rel=1e-5)
    assert cu.metrics["tokens:sum"] == 42
    assert all(METRIC_KEY.match(k) for k in cu.metrics), cu.metrics

    before = params(tc)
    opt = tc.optim_step(tt.AdamParams(learning_rate=1e-3)).result()
    assert isinstance(opt, tt.OptimStepResponse)
    assert all(METRIC_KEY.match(k) for k in opt.metrics), opt.metrics
    after = params(tc)
    assert any(not np.array_equal(before[k], after[k]) for k in before), "optim_step changed nothing"

    saved = tc.save_state("ckpt-1").result()
    assert isinstance(saved, tt.SaveWeightsResponse)
    assert saved.path == f"tinker://{tc.model_id}/weights/ckpt-1"
    samp = tc.save_weights_for_sampler("samp-1").result()
    assert isinstance(samp, tt.SaveWeightsForSamplerResponse)
    assert samp.path == f"tinker://{tc.model_id}/sampler_weights/samp-1"

    # Move away from the checkpoint, then come back with each load flavour.
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(tt.AdamParams(learning_rate=1e-3)).result()
    assert any(not np.array_equal(after[k], v) for k, v in params(tc).items())
    loaded = tc.load_state(saved.path).result()
    assert isinstance(loaded, tt.LoadWeightsResponse) and loaded.path == saved.path
    assert_params_equal(params(tc), after)
    loaded = tc.load_state_with_optimizer(saved.path).result()
    assert isinstance(loaded, tt.LoadWeightsResponse)
    assert_params_equal(params(tc), after)

    for create in (svc.create_training_client_from_state, svc.create_training_client_from_state_with_optimizer):
        tc2 = create(saved.path)
        assert isinstance(tc2, tinker_jax.TrainingClient) and tc2.model_id != tc.model_id
        assert tc2.get_info().lora_rank == RANK and tc2.get_info().model_name == "tiny"
        assert_params_equal(params(tc2), after)
    # The SDK's optional parameters are accepted (base_model names the same model here).
    tc3 = svc.create_training_client_from_state(saved.path, base_model="tiny", user_metadata={"a": "b"})
    assert_params_equal(params(tc3), after)


def test_async_twins(svc):
    data = random_data(1)

    async def main():
        tc = await svc.create_lora_training_client_async("tiny", rank=RANK, seed=5)
        assert isinstance(tc, tinker_jax.TrainingClient)
        results = {}
        for name, call in [
            ("forward", tc.forward_async(data, "cross_entropy")),
            ("forward_backward", tc.forward_backward_async(data, "cross_entropy")),
            ("forward_backward_custom", tc.forward_backward_custom_async(
                data, lambda ds, lps: (sum(-lp.sum() for lp in lps), {}))),
            ("optim_step", tc.optim_step_async(tt.AdamParams(learning_rate=1e-3))),
            ("save_state", tc.save_state_async("async-1")),
            ("save_weights_for_sampler", tc.save_weights_for_sampler_async("async-s1")),
        ]:
            assert inspect.iscoroutine(call), name
            fut = await call
            assert hasattr(fut, "result"), name  # coroutine -> future ...
            results[name] = await fut  # ... -> awaited result
            assert fut.result() == results[name]  # .result() agrees with await
        path = results["save_state"].path
        for name, call in [("load_state", tc.load_state_async(path)),
                           ("load_state_with_optimizer", tc.load_state_with_optimizer_async(path))]:
            results[name] = await (await call)
        results["get_info"] = await tc.get_info_async()
        tc2 = await svc.create_training_client_from_state_async(path)
        tc3 = await svc.create_training_client_from_state_with_optimizer_async(path)
        return tc, tc2, tc3, results

    tc, tc2, tc3, r = asyncio.run(main())
    types = {"forward": tt.ForwardBackwardOutput, "forward_backward": tt.ForwardBackwardOutput,
             "forward_backward_custom": tt.ForwardBackwardOutput, "optim_step": tt.OptimStepResponse,
             "save_state": tt.SaveWeightsResponse, "save_weights_for_sampler": tt.SaveWeightsForSamplerResponse,
             "load_state": tt.LoadWeightsResponse, "load_state_with_optimizer": tt.LoadWeightsResponse,
             "get_info": tt.GetInfoResponse}
    for name, cls in types.items():
        assert isinstance(r[name], cls), (name, type(r[name]))
    assert r["save_weights_for_sampler"].path == f"tinker://{tc.model_id}/sampler_weights/async-s1"
    # The async calls did the same work as the sync ones would: forward == forward_backward logprobs, and
    # the custom loss -sum(lp) equals cross_entropy with unit weights... which here are the datum weights,
    # so compare against the returned logprobs directly.
    for a, b in zip(logprobs(r["forward"]), logprobs(r["forward_backward"])):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert r["forward_backward_custom"].metrics["loss:sum"] == pytest.approx(
        -sum(lp.sum() for lp in logprobs(r["forward"])), rel=1e-5)
    assert_params_equal(params(tc2), params(tc))
    assert_params_equal(params(tc3), params(tc))


def test_sdk_async_idioms(svc, model_dir, tmp_path):
    """What the SDK's scripts (and tinker-cookbook) write in async code works in process: `await` on the create_*
    calls; sample_async and compute_logprobs_async return the result itself; every future is a tinker.APIFuture
    with result_async, future() and coroutine(); prompt_logprobs_last_n leaves only the last N prompt logprobs;
    save_weights_external refuses encryption instead of writing in the clear; close takes the SDK's status."""
    from tinker_jax.errors import UserError

    prompt = tt.ModelInput.from_ints([5, 6, 7, 8, 9])
    params = tt.SamplingParams(max_tokens=3, seed=1, temperature=1.0)

    async def main():
        tc = await svc.create_lora_training_client("tiny", rank=RANK, seed=6)
        sc = await tc.save_weights_and_get_sampling_client()
        fut = sc.sample(prompt, 2, params)
        assert isinstance(fut, tinker.APIFuture)
        task = asyncio.create_task(fut.coroutine())
        first = await fut.result_async(timeout=120)
        assert fut.future().result() is first and (await task) is first
        again = await sc.sample_async(prompt, 2, params)
        assert [s.tokens for s in again.sequences] == [s.tokens for s in first.sequences]
        return tc, sc, await sc.compute_logprobs_async(prompt), await sc.compute_logprobs(prompt, 2)

    tc, sc, full, last = asyncio.run(main())
    assert len(full) == len(last) == 5 and full[0] is None and None not in full[1:]
    assert last[:3] == [None] * 3 and last[3:] == pytest.approx(full[3:])
    with pytest.raises(UserError, match="prompt_logprobs_last_n"):
        sc.compute_logprobs(prompt, prompt_logprobs_last_n=5)
    with pytest.raises(UserError, match="age_encryption_recipients"):
        tc.save_weights_external("sealed", None, ["age1recipient"])
    other = tinker_jax.ServiceClient(data_dir=tmp_path, config=EngineConfig(models={"tiny": str(model_dir)}))
    assert other.close("success").result() is None


def test_base_model_named_by_local_path(svc, model_dir):
    data = random_data(2)
    by_alias = svc.create_lora_training_client("tiny", rank=RANK, seed=0)
    by_path = svc.create_lora_training_client(str(model_dir), rank=RANK, seed=0)
    assert by_path.get_info().model_name == str(model_dir)
    assert by_path.get_tokenizer().encode("abc") == by_alias.get_tokenizer().encode("abc")
    a = logprobs(by_alias.forward(data, "cross_entropy").result())
    b = logprobs(by_path.forward(data, "cross_entropy").result())
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        svc.create_lora_training_client("no-such-model", rank=RANK)


# ------------------------------------------------------------------------------------------------ bad input


def _bad_cases(seed: int = 9):
    """(name, data, loss_fn, loss_fn_config, message regex). The bad datum is always datum[1]."""
    rng = np.random.default_rng(seed)

    def good(n=8, **inputs):
        toks = rng.integers(0, 512, n + 1)
        return datum(toks[:-1], toks[1:], **inputs)

    rl = dict(logprobs=np.full(8, -2.0), advantages=np.ones(8))
    toks = rng.integers(0, 512, 9)
    return [
        ("token_out_of_vocab", [good(), datum([*toks[:3], 512, *toks[4:8]], toks[1:])], "cross_entropy", None,
         r"datum\[1\]\.model_input: token id 512 outside the vocabulary"),
        ("negative_token", [good(), datum([-1, *toks[1:8]], toks[1:])], "cross_entropy", None,
         r"datum\[1\]\.model_input: token id -1 outside"),
        ("target_out_of_vocab", [good(), datum(toks[:8], [*toks[1:8], 9999])], "cross_entropy", None,
         r"datum\[1\]\.loss_fn_inputs\['target_tokens'\].*outside"),
        ("weights_length", [good(), good(weights=np.ones(7))], "cross_entropy", None,
         r"datum\[1\]\.loss_fn_inputs\['weights'\].*does not match model_input length 8"),
        ("targets_length", [good(), datum(toks[:8], toks[1:6])], "cross_entropy", None,
         r"datum\[1\]\.loss_fn_inputs\['target_tokens'\].*length 8"),
        ("missing_advantages", [good(**rl), good(logprobs=np.zeros(8))], "importance_sampling", None,
         r"datum\[1\]\.loss_fn_inputs: missing \['advantages'\].*importance_sampling"),
        ("unknown_loss", [good(), good()], "no_such_loss", None, r"unknown loss_fn 'no_such_loss'"),
        ("unknown_config_key", [good(), good()], "ppo", {"bogus": 1.0},
         r"unknown loss_fn_config key\(s\) \['bogus'\] for loss_fn 'ppo'"),
        ("nan_weight", [good(), good(weights=[1, 1, np.nan, 1, 1, 1, 1, 1])], "cross_entropy", None,
         r"datum\[1\]\.loss_fn_inputs\['weights'\]: contains NaN or inf"),
        ("inf_weight", [good(), good(weights=[1, 1, 1, 1, 1, 1, 1, np.inf])], "cross_entropy", None,
         r"datum\[1\]\.loss_fn_inputs\['weights'\]: contains NaN or inf"),
        ("nan_advantage", [good(**rl), good(logprobs=np.zeros(8), advantages=[0, np.nan, 0, 0, 0, 0, 0, 0])],
         "importance_sampling", None, r"datum\[1\]\.loss_fn_inputs\['advantages'\]: contains NaN or inf"),
        ("inf_advantage", [good(**rl), good(logprobs=np.zeros(8), advantages=[-np.inf, 0, 0, 0, 0, 0, 0, 0])],
         "importance_sampling", None, r"datum\[1\]\.loss_fn_inputs\['advantages'\]: contains NaN or inf"),
        ("empty_batch", [], "cross_entropy", None, r"empty"),
        ("empty_datum", [good(), datum([], [])], "cross_entropy", None, r"datum\[1\]\.model_input: empty"),
        ("too_long", [good(), good(n=513)], "cross_entropy", None,
         r"datum\[1\]\.model_input: length 513 exceeds the model's limit of 512"),
        # Shapes the step could not take: they passed and failed inside the worker (with the round's other requests)
        ("advantages_2d", [good(**rl), good(logprobs=np.zeros(8), advantages=np.ones((8, 2)))], "importance_sampling",
         None, r"datum\[1\]\.loss_fn_inputs\['advantages'\]: shape \(8, 2\), expected \(8,\)"),
        ("targets_k0", [good(), datum(toks[:8], np.zeros((8, 0), np.int64))], "cross_entropy", None,
         r"datum\[1\]\.loss_fn_inputs\['target_tokens'\]: shape \(8, 0\) not supported"),
        ("config_not_a_dict", [good(), good()], "ppo", "abc", r"^loss_fn_config: expected a dict"),
    ]


BAD_CASES = _bad_cases()


@pytest.fixture(scope="module")
def bad_pair(svc):
    """Two identical clients; only the first one sees the bad requests."""
    return (svc.create_lora_training_client("tiny", rank=RANK, seed=21),
            svc.create_lora_training_client("tiny", rank=RANK, seed=21))


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
@pytest.mark.parametrize("method", ["forward_backward", "forward"])
def test_bad_input_raises_clear_value_error_through_future(bad_pair, case, method):
    name, data, loss_fn, config, pattern = case
    fut = getattr(bad_pair[0], method)(data, loss_fn, config)  # the call itself never raises
    with pytest.raises(ValueError, match=pattern):
        fut.result(timeout=120)


def test_bad_input_leaves_accumulated_gradient_intact(bad_pair):
    """good batch, then every bad request, then optim_step == good batch then optim_step (bitwise)."""
    dirty, clean = bad_pair
    assert_params_equal(params(dirty), params(clean))
    good = random_data(3)
    out_dirty = dirty.forward_backward(good, "cross_entropy").result()
    for name, data, loss_fn, config, _ in BAD_CASES:
        with pytest.raises(ValueError):
            dirty.forward_backward(data, loss_fn, config).result(timeout=120)
    with pytest.raises(ValueError, match="adam_params.learning_rate"):
        dirty.optim_step(tt.AdamParams(learning_rate=float("nan"))).result()
    out_clean = clean.forward_backward(good, "cross_entropy").result()
    assert out_dirty.metrics == out_clean.metrics
    adam = tt.AdamParams(learning_rate=1e-2)
    dirty.optim_step(adam).result()
    clean.optim_step(adam).result()
    assert_params_equal(params(dirty), params(clean))
    # ... and the client keeps working afterwards.
    a = dirty.forward_backward(good, "cross_entropy").result()
    b = clean.forward_backward(good, "cross_entropy").result()
    assert a.metrics == b.metrics


PROMPT = [5, 17, 42, 99, 7, 3]


def _one_step_lora(svc):
    """A rank-4 LoRA run on "tiny" after one step on PROMPT (its adapter is no longer zero)."""
    tc = svc.create_lora_training_client("tiny", rank=4, seed=0)
    tc.forward_backward([tt.Datum(model_input=tt.ModelInput.from_ints(PROMPT[:-1]),
                                  loss_fn_inputs={"target_tokens": PROMPT[1:]})], "cross_entropy")
    tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
    return tc


SAMPLE_PARAMS = tt.SamplingParams(max_tokens=12, temperature=1.0, seed=4)


def _assert_sampler_near_trainer(svc, lora_tc):
    """Samples of the LoRA run's snapshot and of the base model at temperature 1: each drawn token's sampler
    logprob within a reduced-precision sampler's bounds (docs/numerics.md: mean < 0.05, max < 0.25) of the
    trainer's fp32 forward, and not the fp32 numbers (max > 1e-5). Returns the base model's sample."""
    for sampler, trainer in ((lora_tc.save_weights_and_get_sampling_client(), lora_tc),
                             (svc.create_sampling_client(base_model="tiny"), None)):
        s = sampler.sample(tt.ModelInput.from_ints(PROMPT), 1, SAMPLE_PARAMS).result().sequences[0]
        seq = PROMPT + list(s.tokens)
        datum = tt.Datum(model_input=tt.ModelInput.from_ints(seq[:-1]), loss_fn_inputs={"target_tokens": seq[1:]})
        trainer = trainer or svc.create_lora_training_client("tiny", rank=4, seed=1)  # B = 0: the base model
        want = logprobs(trainer.forward([datum], "cross_entropy").result())[0][len(PROMPT) - 1:]
        dev = np.abs(np.asarray(s.logprobs) - want)
        assert dev.mean() < 0.05 and dev.max() < 0.25, dev
        assert dev.max() > 1e-5, dev
    return s


def test_bf16_int8_sampler_on_a_float32_engine(model_dir, tmp_path):
    """sampler.dtype bfloat16 and sampler.quantize int8 beside fp32 training, over a tensor=2 mesh: the sampler's
    copy of every block projection is int8 with a per-column scale placed like the kernel's columns, the rest of its
    weights and its KV cache bf16, training's weights untouched; snapshots of a LoRA run and the base model sample
    with it, their logprobs within docs/numerics.md's bounds (bf16 + int8) of the trainer's fp32 forward without
    being the fp32 numbers, and a full run's snapshot is cast and quantized alike."""
    from jax.sharding import PartitionSpec as P

    from tinker_jax.config import SamplerConfig
    from tinker_jax.models import quant
    from tinker_jax.models.sharding import MeshConfig

    cfg = EngineConfig(models={"tiny": str(model_dir)}, mesh=MeshConfig(tensor=2),
                       sampler=SamplerConfig(dtype="bfloat16", quantize="int8", max_seq_len=64))
    with tinker_jax.ServiceClient(data_dir=tmp_path, config=cfg) as svc:
        tc = _one_step_lora(svc)
        full = svc.create_full_training_client("tiny", seed=0)
        worker = svc.engine._worker("tiny")
        assert {x.dtype for x in jax.tree.leaves(worker.base)} == {np.dtype("float32")}  # training is untouched
        assert {x.dtype for x in jax.tree.leaves(worker.sample_base)} == {np.dtype("bfloat16"), np.dtype("int8")}
        assert worker.get_sampler().cache_dtype == jax.numpy.bfloat16
        blocks = worker.sample_base["blocks"]
        for group, names in (("attn", ("q", "k", "v", "o")), ("mlp", ("gate", "up", "down"))):
            for name in names:
                kernel, scale = blocks[group][name]["kernel"][...], blocks[group][name]["scale"][...]
                assert kernel.dtype == np.int8, name
                assert scale.shape == kernel.shape[:-2] + kernel.shape[-1:]
                assert scale.sharding.spec[1:] == kernel.sharding.spec[2:3], name  # columns sharded alike
        assert blocks["mlp"]["up"]["kernel"][...].sharding.spec == P(None, None, "tensor")  # really on the mesh
        assert worker.sample_base["embed"][...].dtype == jax.numpy.bfloat16
        base = _assert_sampler_near_trainer(svc, tc)  # bf16 arithmetic and int8 weights
        # A full run's snapshot is quantized when taken: untrained, it samples exactly what the base model does.
        s = full.save_weights_and_get_sampling_client().sample(tt.ModelInput.from_ints(PROMPT), 1,
                                                               SAMPLE_PARAMS).result().sequences[0]
        assert s.tokens == base.tokens and s.logprobs == base.logprobs
        q, scale = (worker.sample_base["blocks"]["mlp"]["down"][k][...] for k in ("kernel", "scale"))
        step = np.asarray(scale, np.float32)  # the bf16 copy of each column's scale: within 2^-8 of the fp32 one
        w = np.asarray(worker.base["blocks"]["mlp"]["down"]["kernel"][...])
        err = np.abs(np.asarray(quant.dequantize(q, step)) - w)
        assert 0 < err.max() <= step.max() * (0.5 + 127 / 256)


@pytest.mark.parametrize("moe_impl", ["blocked", "ragged"])
def test_quantized_decoder_equals_its_dequantized_weights(moe_impl):
    """models.quant on a MoE model (tiny-qwen3-moe): every block projection and each MoE layer's experts are int8
    (7 stacked weights), and the quantized decoder's logits equal those of the float decoder given the dequantized
    weights (fp32), with either grouped matmul; embedding, norms, routers and the untied unembedding are
    untouched."""
    import jax.numpy as jnp
    from flax import nnx

    from tinker_jax.hf.presets import get_preset
    from tinker_jax.models import quant
    from tinker_jax.models.config import config_from_hf
    from tinker_jax.models.decoder import Decoder, Linear
    from tinker_jax.models.moe import MoeMLP

    cfg = config_from_hf(get_preset("tiny-qwen3-moe"), source="test")
    dec = Decoder(cfg, rngs=nnx.Rngs(params=0), moe_impl=moe_impl)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    forward = jax.jit(lambda graph, state: (lambda m: m.logits(m(tokens, positions)[0]))(nnx.merge(graph, state)))
    before = forward(*nnx.split(dec))
    ref = nnx.merge(*nnx.split(dec))  # a second module over the same arrays: its weights get replaced below
    assert quant.quantize_blocks(dec) == 4 + 3  # the attention projections and the 3 expert weights
    for (_, m), (_, r) in zip(nnx.iter_modules(dec), nnx.iter_modules(ref)):
        if isinstance(m, Linear) and m.scale is not None:
            r.kernel = nnx.Param(quant.dequantize(m.kernel[...], m.scale[...]))
        elif isinstance(m, MoeMLP):
            assert m.router[...].dtype == jnp.float32
            for name in quant.EXPERTS:
                assert getattr(m, name)[...].dtype == jnp.int8
                setattr(r, name, nnx.Param(quant.dequantize(getattr(m, name)[...], getattr(m, f"{name}_scale")[...])))
    assert dec.lm_head.scale is None and dec.embed[...].dtype == jnp.float32
    got, want = (forward(*nnx.split(m)) for m in (dec, ref))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(before)).max() > 1e-5  # the weights were really rounded


def test_cast_for_the_sampler_copies_even_in_the_same_dtype():
    """BaseWorker._cast (a snapshot's weights for the sampler): a full run's next optimizer step donates its arrays,
    so casting to the dtype an array already has must still copy it."""
    from types import SimpleNamespace

    from tinker_jax.engine.worker import BaseWorker

    params = {"w": jax.numpy.ones((3, 4)), "ids": jax.numpy.arange(3)}
    for dt in (jax.numpy.float32, jax.numpy.bfloat16):
        out = BaseWorker._cast(SimpleNamespace(sample_dtype=dt, sample_quant=None, sample_graphdef=None), params)
        assert out["w"].dtype == dt and out["ids"].dtype == params["ids"].dtype
        assert not any(x is y for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(params)))


def test_quantize_int8_rounds_each_column_to_its_own_scale():
    """models.quant: every weight within half its column's step of the original, each column's largest magnitude
    exact, an all-zero column kept at zero; a quantized Linear computes x @ dequantize(kernel) (fp32)."""
    import jax.numpy as jnp
    from flax import nnx

    from tinker_jax.models import quant
    from tinker_jax.models.decoder import Linear

    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 16, 8)).astype(np.float32)  # [layers, in, out]
    w[1, :, 5] = 0.0
    q, scale = quant.quantize_int8(jnp.asarray(w))
    q, scale = np.asarray(q), np.asarray(scale)
    back = q.astype(np.float32) * scale[:, None, :]
    assert (np.abs(back - w) <= scale[:, None, :] / 2 + 1e-7).all()
    assert np.allclose(np.abs(back).max(axis=1), np.abs(w).max(axis=1), rtol=1e-6)
    assert (back[1, :, 5] == 0).all() and np.abs(q).max() == 127
    lin = Linear(16, 8, ("embed", "mlp"), "up", rngs=nnx.Rngs(params=0))
    dense = np.asarray(lin.kernel[...])
    assert quant.quantize_blocks(lin) == 1 and lin.kernel[...].dtype == jnp.int8
    x = rng.normal(size=(2, 3, 16)).astype(np.float32)
    want = x @ np.asarray(quant.dequantize(lin.kernel[...], lin.scale[...]))
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)
    assert np.abs(want - x @ dense).max() > 1e-6  # rounding really happened
    with pytest.raises(ValueError, match="sampler.quantize"):
        quant.quantize_blocks(lin, "int4")


# ------------------------------------------------------------------------------------------------ RestClient


def test_rest_client_runs_and_checkpoints(svc):
    """create_rest_client(): the runs and checkpoints of the engine as the SDK's types, changed through it."""
    from pathlib import Path
    from urllib.parse import urlparse

    tc = svc.create_lora_training_client("tiny", rank=RANK, seed=0, user_metadata={"who": "rest"})
    state = tc.save_state("r1", overwrite=True).result().path
    sampler = tc.save_weights_for_sampler("r1s").result().path
    external = tc.save_weights_external("r1e").result().path
    rc = svc.create_rest_client()
    assert isinstance(rc, tinker_jax.RestClient)

    run = rc.get_training_run(tc.model_id).result()
    assert isinstance(run, tt.TrainingRun)
    assert (run.training_run_id, run.base_model, run.is_lora, run.lora_rank) == (tc.model_id, "tiny", True, RANK)
    assert run.last_checkpoint.tinker_path == state and run.last_sampler_checkpoint.tinker_path == sampler
    assert run.user_metadata == {"who": "rest"}
    assert rc.get_training_run_by_tinker_path(sampler).result() == run

    listed = rc.list_checkpoints(tc.model_id).result()
    assert {c.tinker_path: c.checkpoint_type for c in listed.checkpoints} == {
        state: "training", sampler: "sampler", external: "external"}
    assert listed.cursor.total_count == 3
    mine = {c.tinker_path for c in rc.list_user_checkpoints(limit=1000).result().checkpoints}
    assert {state, sampler, external} <= mine
    first = rc.list_training_runs(limit=1).result()
    assert len(first.training_runs) == 1 and first.cursor.total_count >= 1
    assert tc.model_id in {r.training_run_id for r in rc.list_training_runs(limit=1000).result().training_runs}
    assert rc.list_training_runs(project_id="p").result().training_runs == []  # no projects in process

    for path in (state, sampler, external):  # an external one answers from its record (it has no Orbax metadata)
        info = rc.get_weights_info_by_tinker_path(path).result()
        assert (info.base_model, info.is_lora, info.lora_rank) == ("tiny", True, RANK), path

    rc.publish_checkpoint_from_tinker_path(state).result()
    assert next(c for c in rc.list_checkpoints(tc.model_id).result().checkpoints if c.tinker_path == state).public
    rc.unpublish_checkpoint_from_tinker_path(state).result()
    assert not next(c for c in rc.list_checkpoints(tc.model_id).result().checkpoints
                    if c.tinker_path == state).public
    rc.set_checkpoint_ttl_from_tinker_path(state, 3600).result()
    assert rc.get_training_run(tc.model_id).result().last_checkpoint.expires_at is not None
    rc.set_checkpoint_ttl_from_tinker_path(state, None).result()
    assert rc.get_training_run(tc.model_id).result().last_checkpoint.expires_at is None

    urls = rc.get_external_weights_urls(external).result().urls
    assert "adapter_config.json" in urls and all(Path(urlparse(u).path).is_file() for u in urls.values())

    copy = rc.copy_weights(state, "proj").result()
    assert copy != state and copy.endswith("/weights/r1")
    assert rc.get_weights_info_by_tinker_path(copy).result().lora_rank == RANK

    rc.delete_checkpoint_from_tinker_path(state).result()
    rc.delete_checkpoint(tc.model_id, "sampler_weights/r1s").result()
    left = {c.tinker_path for c in rc.list_checkpoints(tc.model_id).result().checkpoints}
    assert left == {external}
    assert svc.create_training_client_from_state(copy).get_info().lora_rank == RANK  # the copy's files remain
    assert asyncio.run(rc.get_training_run_async(tc.model_id)).last_checkpoint is None


def test_rest_client_refusals_name_the_field(svc):
    tc = svc.create_lora_training_client("tiny", rank=RANK, seed=0)
    path = tc.save_state("r2", overwrite=True).result().path
    rc = svc.create_rest_client()
    cases = [  # refused through the future
        (lambda: rc.get_training_run("run-nope"), "^training_run_id: unknown training run"),
        (lambda: rc.list_checkpoints("run-nope"), "^training_run_id: unknown training run"),
        (lambda: rc.get_weights_info_by_tinker_path(path.replace("r2", "r3")), "^tinker_path: checkpoint .* not found"),
        (lambda: rc.delete_checkpoint(tc.model_id, "r2"), "^checkpoint_id: expected 'weights/<name>'"),
        (lambda: rc.delete_checkpoint("../x", "weights/r2"), "^training_run_id: invalid name"),
        (lambda: rc.delete_checkpoint(tc.model_id, "weights/r3"), "^checkpoint_id: checkpoint .* not found"),
        (lambda: rc.copy_weights(path, ""), "^destination_project_id: required"),
        (lambda: rc.set_checkpoint_ttl_from_tinker_path(path, -1), "^ttl_seconds: must be a whole number"),
        (lambda: rc.set_checkpoint_ttl_from_tinker_path(path, "1h"), "^ttl_seconds: must be a whole number"),
        (lambda: rc.list_user_checkpoints(limit=-1), "^limit: "),
        (lambda: rc.copy_weights(path, "proj", ttl_seconds=0), "^ttl_seconds: must be a whole number"),
    ]
    for call, match in cases:
        fut = call()
        with pytest.raises(ValueError, match=match):
            fut.result()
    # Raised at the call, where the SDK's checks run in the client.
    with pytest.raises(ValueError, match="destination_project_id"):
        rc.copy_weights(path)
    with pytest.raises(ValueError, match="^tinker_path: "):
        rc.get_training_run_by_tinker_path("nope")
    with pytest.raises(ValueError, match="^tinker_path: .* is not an external_weights checkpoint"):
        rc.get_external_weights_urls(path)
    with pytest.raises(ValueError, match="^service: "):
        tinker_jax.RestClient()
    rc.delete_checkpoint_from_tinker_path(path).result()
    with pytest.raises(ValueError, match="^tinker_path: checkpoint .* not found"):
        rc.delete_checkpoint_from_tinker_path(path).result()


def test_in_process_ttl_is_checked_before_the_save(svc):
    """ttl_seconds is the server's (0, 10 years] in process too: refused with the field named, nothing written
    (a negative one saved an already-expired checkpoint; a string failed inside the worker)."""
    tc = svc.create_lora_training_client("tiny", rank=RANK, seed=0)
    for ttl in (-5, 0, "abc", 1.5, True):
        for save in (lambda: tc.save_state("t", ttl_seconds=ttl), lambda: tc.save_weights_for_sampler("t", ttl),
                     lambda: tc.save_weights_external("t", ttl)):
            with pytest.raises(ValueError, match="^ttl_seconds: must be a whole number"):
                save().result()
    assert svc.engine.list_checkpoints(tc.model_id) == []
    assert tc.save_state("t", ttl_seconds=60).result().path.endswith("/weights/t")


def test_in_process_checkpoints_past_their_ttl_are_deleted(model_dir, tmp_path, monkeypatch):
    """The REST server deletes checkpoints past their TTL on a timer; an in-process client does the same (before
    this, nothing did, and the RestClient refused to delete one as not found). Until its delete runs, one past
    its TTL is left out of listings and can still be deleted or given a new TTL."""
    import tinker_jax.client as client_mod

    monkeypatch.setattr(client_mod, "EXPIRE_EVERY_S", 3600.0)
    with tinker_jax.ServiceClient(data_dir=tmp_path, config=EngineConfig(models={"tiny": str(model_dir)})) as s:
        tc = s.create_lora_training_client("tiny", rank=RANK, seed=0)
        rc = s.create_rest_client()
        a, b = (tc.save_state(n, ttl_seconds=1).result().path for n in ("a", "b"))
        time.sleep(1.2)
        assert rc.list_checkpoints(tc.model_id).result().checkpoints == []  # hidden at once
        rc.set_checkpoint_ttl_from_tinker_path(b, None).result()  # still on record: kept after all
        rc.delete_checkpoint_from_tinker_path(a).result()
        assert [c.tinker_path for c in rc.list_checkpoints(tc.model_id).result().checkpoints] == [b]
        c = tc.save_state("c", ttl_seconds=1).result().path
    time.sleep(1.2)
    monkeypatch.setattr(client_mod, "EXPIRE_EVERY_S", 0.1)
    with tinker_jax.ServiceClient(data_dir=tmp_path, config=EngineConfig(models={"tiny": str(model_dir)})) as s:
        deadline = time.monotonic() + 30
        while s.engine.get_checkpoint(c) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.engine.get_checkpoint(c) is None and s.engine.get_checkpoint(b) is not None


def test_optimizer_and_custom_loss_refusals(svc):
    """Adam hyperparameters that would make the weights NaN (eps 0: 0 / 0 where there is no gradient; values past
    fp32's range), and forward_backward_custom's checks (the SDK's): refused through the future, nothing changed."""
    tc = svc.create_lora_training_client("tiny", rank=RANK, seed=5)
    tc.forward_backward(random_data(3), "cross_entropy").result()
    before = params(tc)
    for bad, match in ((dict(eps=0.0), r"^adam_params\.eps: must be > 0"),
                       (dict(learning_rate=1e39), r"^adam_params\.learning_rate: must be at most"),
                       (dict(weight_decay=1e39), r"^adam_params\.weight_decay: must be at most")):
        with pytest.raises(ValueError, match=match):
            tc.optim_step(tt.AdamParams(**{"learning_rate": 1e-3, **bad})).result()
    assert_params_equal(params(tc), before)
    data = random_data(4)
    with pytest.raises(ValueError, match=r"^loss_fn: no gradient reached the logprobs of datum\[1\]"):
        tc.forward_backward_custom(data, lambda ds, lps: (lps[0].sum(), {})).result()
    no_targets = [tt.Datum(model_input=d.model_input, loss_fn_inputs={}) for d in data]
    with pytest.raises(ValueError, match=r"^datum\[0\]\.loss_fn_inputs: missing \['target_tokens'\]"):
        tc.forward_backward_custom(no_targets, lambda ds, lps: (sum(x.sum() for x in lps), {})).result()
    with pytest.raises(ValueError, match=r"^user_metadata: expected a dict"):
        tc.save_state("meta", user_metadata="abc").result()
    tc.optim_step(tt.AdamParams(learning_rate=1e-3)).result()
    assert all(np.all(np.isfinite(v)) for v in params(tc).values())


def test_sampling_edge_requests(svc):
    """A tiny temperature keeps finite logprobs (logits / T overflowed to inf); prompt_logprobs_last_n leaves the
    target and alt-token scores alone (SDK: it "does not affect" them; they were dropped) and takes a numpy int;
    num_samples is checked before anything is made of it; a prompt that is not a ModelInput is named."""
    sc = svc.create_sampling_client(base_model="tiny")
    prompt = tt.ModelInput.from_ints([5, 17, 99, 3, 250, 41, 7])
    greedy = sc.sample(prompt, 1, tt.SamplingParams(max_tokens=4, temperature=0.0)).result().sequences[0]
    for t in (1e-30, 1e-12, 1e-8):
        seq = sc.sample(prompt, 1, tt.SamplingParams(max_tokens=4, temperature=t, seed=1),
                        topk_sample_logprobs=2).result().sequences[0]
        assert seq.tokens == greedy.tokens, t
        assert all(np.isfinite(x) and x <= 0 for x in seq.logprobs), (t, seq.logprobs)
    targets = tt.TensorData.from_numpy(np.array([[1], [2], [3], [4], [5], [6]], np.int64))
    full = sc.sample(prompt, 1, tt.SamplingParams(max_tokens=1), include_prompt_logprobs=True,
                     target_prompt_logprobs=targets, prompt_alt_tokens_k=2).result()
    last = sc.sample(prompt, 1, tt.SamplingParams(max_tokens=1), include_prompt_logprobs=True,
                     target_prompt_logprobs=targets, prompt_alt_tokens_k=2,
                     prompt_logprobs_last_n=np.int64(3)).result()
    assert last.target_prompt_logprobs is not None and last.prompt_alt_tokens is not None
    np.testing.assert_array_equal(last.target_prompt_logprobs.to_numpy(), full.target_prompt_logprobs.to_numpy())
    assert [x is None for x in last.prompt_logprobs] == [True] * 4 + [False] * 3  # [first] + 3 masked, 3 kept
    for n in (2.0, None, 10**7):
        with pytest.raises(ValueError, match=r"^num_samples: must be an integer"):
            sc.sample(prompt, n, tt.SamplingParams(max_tokens=1)).result()
    with pytest.raises(ValueError, match=r"^prompt: expected a tinker.types.ModelInput"):
        sc.sample([5, 17, 99], 1, tt.SamplingParams(max_tokens=1)).result()


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_a_gradient_that_is_not_finite_is_not_applied(svc, full):
    """Importance ratios that overflow (sampling logprobs far below the model's) give an infinite loss and a
    gradient that is not finite: optim_step refuses to apply it (the weights and Adam's moments stay as they were,
    the gradient is dropped) instead of turning every weight of the run into NaN for good."""
    tc = (svc.create_full_training_client("tiny", seed=6) if full
          else svc.create_lora_training_client("tiny", rank=RANK, seed=6))
    tc.forward_backward(random_data(5), "cross_entropy").result()
    tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()  # moments to keep
    before = params(tc)
    st = tc.engine.run_state(tc.model_id)
    moments = {k: flat(st[k]) for k in ("mu", "nu")}
    bad = random_data(6, logprobs=-200.0, advantages=1.0)
    bad = [tt.Datum(model_input=d.model_input, loss_fn_inputs={k: v for k, v in d.loss_fn_inputs.items()
                                                               if k != "weights"}) for d in bad]
    loss = tc.forward_backward(bad, "importance_sampling").result().metrics["loss:sum"]
    assert not np.isfinite(loss)
    with pytest.raises(ValueError, match=r"^optim_step: the norm of the gradient accumulated since the last "
                                         r"optim_step is not finite"):
        tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
    assert_params_equal(params(tc), before)
    st = tc.engine.run_state(tc.model_id)
    for k in ("mu", "nu"):
        got = flat(st[k])
        assert got.keys() == moments[k].keys() and all(np.array_equal(got[n], moments[k][n]) for n in got), k
    tc.forward_backward(random_data(7), "cross_entropy").result()  # the bad gradient is gone: this one alone
    assert np.isfinite(tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result().metrics["grad_norm:mean"])
    assert all(np.all(np.isfinite(v)) for v in params(tc).values())
