"""Engine 2: many LoRA runs on one base model, batched together, isolated and fairly scheduled.

- the scheduler's policy on its own (no device): per-run order, barriers, path order, fairness, budgets;
- mixed batch == separate runs: four runs of ranks 4, 8, 16, 32 with different losses and seeds, trained
  concurrently (every step of all four in one batch, their optimizer steps in one round, their samples in the same
  decode calls), give the losses, weights and sampled tokens/logprobs of each run trained alone;
- isolation: what run A does (train, save, load, delete, unload, a failing request) never changes run B;
- fairness: a tenant flooding the log delays another tenant's single request by at most a round or two;
- backpressure: past the queue bounds a submit fails at once (Overloaded -> HTTP 429, which the SDK retries), and
  every request then completes exactly once.

tiny-qwen3 (V 512), data of a few short rows; everything fp32.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import jax
import models_util
from models_util import flat, rel
import numpy as np
import pytest
import tinker.types as tt

import tinker_jax
from tinker_jax.config import EngineConfig
from tinker_jax.engine.scheduler import Request, Scheduler
from tinker_jax.errors import Overloaded, UserError

PRESET = "tiny-qwen3"
VOCAB = 512
# A large eps: Adam's first step moves an element by about lr * g / (|g| + eps), so with the SDK's 1e-12 an element
# whose gradient is near zero moves by +-lr as its last bits fall. A mixed batch and a run alone reduce in different
# orders (gradients equal to ~1e-6 relative), and on an AVX2-only CPU with the tests' XLA flags one run's weights
# came out 1.5e-3 apart after one step; with eps 0.1 a rounding difference d moves an update by at most lr * d / eps
# (all results within 2e-6 there). A mixing bug still shows: it moves gradients by far more than rounding.
ADAM = tt.AdamParams(learning_rate=1e-2, weight_decay=0.01, eps=0.1)
RUNS = [  # rank, loss, loss config, seed
    (4, "cross_entropy", None, 11),
    (8, "importance_sampling", None, 12),
    (16, "ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, 13),
    (32, "cross_entropy", None, 14),
    (4, "importance_sampling", None, 15),  # a second rank-4 run: two slots in one rank's rows
]
STEPS = 2  # the second step runs on the first one's Adam state


def datum(tokens, targets, **inputs) -> tt.Datum:
    fields = {"target_tokens": tt.TensorData.from_numpy(np.asarray(targets, np.int64))}
    fields.update({k: tt.TensorData.from_numpy(np.asarray(v, np.float32)) for k, v in inputs.items()})
    return tt.Datum(model_input=tt.ModelInput.from_ints([int(t) for t in tokens]), loss_fn_inputs=fields)


def run_data(run: int, step: int, loss: str) -> list[tt.Datum]:
    rng = np.random.default_rng(1000 * run + step)
    out = []
    for n in rng.integers(4, 16, 3):
        toks = rng.integers(0, VOCAB, n + 1)
        if loss == "cross_entropy":
            inputs = {"weights": rng.uniform(0.5, 1.5, n)}
        else:
            inputs = {"logprobs": -rng.uniform(3.0, 9.0, n), "advantages": rng.normal(size=n)}
        out.append(datum(toks[:-1], toks[1:], **inputs))
    return out




def logprobs(out) -> list[np.ndarray]:
    return [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]


@pytest.fixture(scope="module")
def model_dir():
    return models_util.tiny_model_dir(PRESET)


def service(model_dir, data_dir, **kw) -> tinker_jax.ServiceClient:
    return tinker_jax.ServiceClient(config=EngineConfig(data_dir=data_dir, models={"tiny": str(model_dir)},
                                                        compile_cache=False, **kw))


def worker(svc):
    return svc.engine._workers["tiny"]


# ------------------------------------------------------------------------------------------- scheduler policy


def _req(kind, run, tenant="t", tokens=1, after=()):
    return Request(kind, None, Future(), run=run, tenant=tenant, tokens=tokens, after=tuple(after))


def test_scheduler_order_barriers_and_fairness():
    s = Scheduler(round_tokens=10)
    flood = [_req("forward_backward", "a", "A", tokens=4) for _ in range(20)]
    for r in flood:
        s.push(r)
    b = [_req("forward_backward", "b", "B", tokens=4), _req("optim_step", "b", "B"),
         _req("forward_backward", "b", "B", tokens=4)]
    for r in b:
        s.push(r)
    r1 = s.next_round()
    # Every ready run gets one request before any run gets a second; the budget then stops the second pass.
    assert r1.batch[:2] == [flood[0], b[0]] and r1.ops == []
    assert sum(r.tokens for r in r1.batch) <= 10
    r2 = s.next_round()
    assert b[1] in r2.ops and b[2] not in r2.batch  # the barrier runs alone, after the run's earlier requests
    r3 = s.next_round()
    assert b[2] in r3.batch
    # Run a's requests come out in submission order.
    seen = [r for rnd in (r1, r2, r3) for r in rnd.batch if r.run == "a"]
    assert seen == flood[: len(seen)]

    # A request waits for the request it depends on (a later read of a checkpoint path being written).
    s = Scheduler(round_tokens=10)
    save = _req("save", "x")
    load = _req("load", "y", after=[save.future])
    s.push(save)
    s.push(load)
    first = s.next_round()
    assert first.ops == [save] and not s.ready()
    assert not s.next_round()  # nothing ready: the load waits
    save.future.set_result(None)
    assert s.next_round().ops == [load]

    # A request the client cancelled before it started is dropped.
    s = Scheduler(round_tokens=10)
    gone, kept = _req("forward", "a"), _req("forward", "a")
    s.push(gone)
    s.push(kept)
    gone.future.cancel()
    assert s.next_round().batch == [kept] and len(s) == 0


def test_scheduler_rounds_bound_the_wait_of_a_second_tenant():
    s = Scheduler(round_tokens=8)
    for _ in range(100):
        s.push(_req("forward_backward", f"a{_ % 3}", "A", tokens=8))  # one tenant, three runs, each a full round
    mine = _req("forward_backward", "b", "B", tokens=8)
    s.push(mine)
    rounds = 0
    while True:
        rounds += 1
        if mine in s.next_round().batch:
            break
    assert rounds <= 2, rounds


# ------------------------------------------------------------------------------------------- mixed == alone


def _train(svc, runs: list[int], together: bool, steps: int = STEPS):
    """Train `runs` (indices into RUNS) for `steps` steps; together: each step's requests of every run in one round.
    -> per run: losses, last logprobs, final weights, sampled sequences."""
    out = {}
    clients = {i: svc.create_lora_training_client("tiny", rank=RUNS[i][0], seed=RUNS[i][3]) for i in runs}
    w = worker(svc)
    for step in range(steps):
        for group in ([runs] if together else [[i] for i in runs]):
            with w.hold():
                futs = {i: clients[i].forward_backward(run_data(i, step, RUNS[i][1]), RUNS[i][1], RUNS[i][2])
                        for i in group}
            for i, f in futs.items():
                res = f.result()
                out.setdefault(i, {"losses": []})["losses"].append(res.metrics["loss:sum"])
                out[i]["metrics"] = dict(res.metrics)
                out[i]["logprobs"] = logprobs(res)
            with w.hold():
                futs = {i: clients[i].optim_step(ADAM) for i in group}
            for f in futs.values():
                f.result()
    samplers = {i: clients[i].save_weights_and_get_sampling_client() for i in runs}
    prompt = tt.ModelInput.from_ints([5, 17, 99, 3, 250, 41])
    for group in ([runs] if together else [[i] for i in runs]):
        with w.hold():
            futs = {i: samplers[i].sample(prompt, 2, tt.SamplingParams(max_tokens=6, temperature=1.0, seed=i))
                    for i in group}
        for i, f in futs.items():
            out[i]["samples"] = [(s.tokens, np.asarray(s.logprobs)) for s in f.result().sequences]
    for i in runs:
        out[i]["weights"] = flat(svc.engine.run_state(clients[i].model_id)["weights"])
    return out


@pytest.mark.parametrize("preset,order,steps", [
    (PRESET, [0, 1, 2, 3], STEPS),
    # Mixture of experts: every run's adapters on every expert (two rank-4 runs share that rank's rows).
    ("tiny-qwen3-moe", [0, 4], 1),
])
def test_mixed_batch_equals_separate_runs(preset, order, steps, tmp_path):
    model_dir = models_util.tiny_model_dir(preset)
    with service(model_dir, tmp_path / "mixed") as svc:
        mixed = _train(svc, order, together=True, steps=steps)
        stats = svc.engine.stats()["models"]["tiny"]
    with service(model_dir, tmp_path / "alone") as svc:
        alone = _train(svc, order, together=False, steps=steps)
        alone_stats = svc.engine.stats()["models"]["tiny"]
    # Really batched: every run's forward_backward in one micro-batch, their samples in shared decode calls.
    assert stats["max_requests_per_batch"] == len(order) and alone_stats["max_requests_per_batch"] == 1
    assert stats["micro_batches"] == steps and alone_stats["micro_batches"] == steps * len(order)
    assert stats["sampler"]["decode_calls"] < alone_stats["sampler"]["decode_calls"]
    for i in order:
        m, a = mixed[i], alone[i]
        np.testing.assert_allclose(m["losses"], a["losses"], rtol=1e-5)
        # Each request reports its own loss's metrics only (ppo's clipped-token count; nothing for the others).
        assert set(m["metrics"]) == set(a["metrics"]) == {"loss:sum"} | (
            {"clipped_tokens:sum"} if RUNS[i][1] == "ppo" else set()) | (
            {"router_aux_loss:mean"} if "moe" in preset else set())
        for k in set(m["metrics"]) - {"loss:sum"}:
            assert m["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-5), k
        for x, y in zip(m["logprobs"], a["logprobs"]):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
        assert rel(m["weights"], a["weights"]) < 1e-5, (i, rel(m["weights"], a["weights"]))
        assert any(np.any(v) for k, v in m["weights"].items() if k.endswith("['b']"))  # training moved them
        for (mt, ml), (at, al) in zip(m["samples"], a["samples"]):
            assert mt == at
            np.testing.assert_allclose(ml, al, rtol=1e-5, atol=1e-5)
    assert len({tuple(mixed[i]["samples"][0][0]) for i in order}) > 1  # different adapters sample differently


# ------------------------------------------------------------------------------------------- isolation


def test_isolation_between_runs(model_dir, tmp_path):
    with service(model_dir, tmp_path) as svc:
        a = svc.create_lora_training_client("tiny", rank=4, seed=1)
        b = svc.create_lora_training_client("tiny", rank=4, seed=2)  # same pool as A: neighbouring slots
        c = svc.create_lora_training_client("tiny", rank=8, seed=3)
        b.forward_backward(run_data(1, 0, "cross_entropy"), "cross_entropy").result()
        b.optim_step(ADAM).result()
        b.forward_backward(run_data(1, 1, "cross_entropy"), "cross_entropy").result()  # a pending gradient
        probe = run_data(2, 0, "cross_entropy")

        def b_view():
            st = svc.engine.run_state(b.model_id)
            out = b.forward(probe, "cross_entropy").result()
            return out.metrics["loss:sum"], logprobs(out), {k: flat(st[k]) for k in ("weights", "grads", "mu", "nu")}

        ref = b_view()

        def same():
            loss, lps, state = b_view()
            assert loss == ref[0]
            for x, y in zip(lps, ref[1]):
                np.testing.assert_array_equal(x, y)
            for k in state:
                for name in state[k]:
                    np.testing.assert_array_equal(state[k][name], ref[2][k][name], err_msg=f"{k} {name}")

        for step in range(2):
            a.forward_backward(run_data(0, step, "cross_entropy"), "cross_entropy").result()
            a.optim_step(tt.AdamParams(learning_rate=0.1, weight_decay=0.5)).result()  # weight decay: A's slot only
        same()
        path = a.save_state("a1").result().path
        a.save_weights_for_sampler("a1s").result()
        same()
        a.load_state(path).result()
        same()
        assert svc.engine.delete_checkpoint(path).result() is True
        same()
        a_slot = svc.engine.run_state(a.model_id)["slot"]
        svc.engine.unload_model(a.model_id).result()
        same()

        # A freed slot is zeroed before reuse: a new run in A's slot starts from its own fresh adapter.
        d = svc.create_lora_training_client("tiny", rank=4, seed=1)
        st = svc.engine.run_state(d.model_id)
        assert st["slot"] == a_slot and st["count"] == 0 and st["pending"] == 0
        assert not any(np.any(x) for x in jax.tree.leaves((st["grads"], st["mu"], st["nu"])))
        assert not any(np.any(v) for k, v in flat(st["weights"]).items() if k.endswith("['b']"))
        fresh = flat(svc.engine.run_state(svc.create_lora_training_client("tiny", rank=4, seed=1).model_id)["weights"])
        for k, v in flat(st["weights"]).items():
            np.testing.assert_array_equal(v, fresh[k])

        # A failing request of one run in a round fails only its own future.
        c8 = c.save_state("c8").result().path  # a rank-8 checkpoint: does not fit a rank-4 run
        with worker(svc).hold():
            bad = d.load_state(c8)
            good_b = b.forward(probe, "cross_entropy")
            good_c = c.forward_backward(probe, "cross_entropy")
            bad_data = d.forward_backward([datum([1, 2], [3, VOCAB + 5])], "cross_entropy")  # fails at submit
        with pytest.raises(UserError, match="does not match this model"):
            bad.result()
        with pytest.raises(UserError, match="target_tokens"):
            bad_data.result()
        assert good_b.result().metrics["loss:sum"] == pytest.approx(ref[0], rel=1e-5)
        assert np.isfinite(good_c.result().metrics["loss:sum"])
        same()


# ------------------------------------------------------------------------------------------- fairness


def test_flooding_tenant_cannot_starve_another(model_dir, tmp_path):
    with service(model_dir, tmp_path, round_tokens=32) as svc:
        eng = svc.engine
        a = eng.create_model("tiny", rank=4, seed=1, tenant="A").result()
        b = eng.create_model("tiny", rank=4, seed=2, tenant="B").result()
        w = eng._workers["tiny"]
        data = run_data(0, 0, "cross_entropy")[:1]
        with w.hold():
            flood = [eng.forward_backward(a, data, "cross_entropy", tenant="A") for _ in range(40)]
        while not flood[0].done():
            time.sleep(0.01)
        submitted = w.scheduler.rounds
        finished = {}
        mine = eng.forward_backward(b, data, "cross_entropy", tenant="B")
        mine.add_done_callback(lambda _: finished.setdefault("round", w.scheduler.rounds))
        mine.result(timeout=120)
        left = sum(not f.done() for f in flood)
        assert finished["round"] - submitted <= 2, (finished, submitted)
        assert left >= 20, left  # it did not wait behind the flood
        for f in flood:
            f.result(timeout=300)
        assert eng.run_state(a)["pending"] == 40


# ------------------------------------------------------------------------------------------- backpressure


def test_queue_bounds_refuse_at_once_and_everything_completes_once(model_dir, tmp_path):
    with service(model_dir, tmp_path, max_queued_per_tenant=3, max_queued=5) as svc:
        eng = svc.engine
        a = eng.create_model("tiny", rank=4, seed=1, tenant="A").result()
        b = eng.create_model("tiny", rank=4, seed=2, tenant="B").result()
        data = run_data(0, 0, "cross_entropy")[:1]
        with eng._workers["tiny"].hold():
            mine = [eng.forward_backward(a, data, "cross_entropy", tenant="A") for _ in range(3)]
            with pytest.raises(Overloaded, match="this session"):
                eng.forward_backward(a, data, "cross_entropy", tenant="A")
            theirs = [eng.forward_backward(b, data, "cross_entropy", tenant="B") for _ in range(2)]
            with pytest.raises(Overloaded, match="the server"):
                eng.forward_backward(b, data, "cross_entropy", tenant="B")
            assert not any(f.done() for f in mine + theirs)
        for f in mine + theirs:
            f.result(timeout=120)
        assert eng.run_state(a)["pending"] == 3 and eng.run_state(b)["pending"] == 2
        assert eng.stats()["refused"] == 2
        # The in-process client retries like the SDK does: many more submits than the bound all go through.
        tc = svc.create_lora_training_client("tiny", rank=4, seed=3)
        futs = [tc.forward_backward(data, "cross_entropy") for _ in range(12)]
        for f in futs:
            f.result(timeout=120)
        assert eng.run_state(tc.model_id)["pending"] == 12
        assert eng.stats()["inflight"] == {}


@pytest.mark.slow
def test_sdk_retries_429_and_every_request_completes_once(model_dir, tmp_path):
    """The real tinker SDK against our server with a per-session bound of 2: concurrent forward_backward calls
    beyond it are answered 429, the SDK backs off and resubmits (same seq_id), and each lands exactly once."""
    from server.settings import ServerSettings
    from test_conformance import API_KEY, LiveServer

    cfg = EngineConfig(data_dir=tmp_path, models={"tiny": str(model_dir)}, compile_cache=False,
                       max_queued_per_tenant=2)
    live = LiveServer(cfg, ServerSettings(data_dir=tmp_path, api_keys=(API_KEY,), long_poll_s=5.0))
    live.start()
    try:
        client = live.client()
        tc = client.create_lora_training_client(base_model="tiny", rank=4)
        tc = tc.result() if hasattr(tc, "result") else tc
        data = run_data(0, 0, "cross_entropy")[:1]

        hold = live.engine._workers["tiny"].hold()
        hold.__enter__()  # the first two queue up and stay queued: the rest must be refused until they finish
        threading.Timer(1.5, hold.__exit__, (None, None, None)).start()
        futs = [tc.forward_backward(data, "cross_entropy") for _ in range(6)]  # submitted at once (SDK 0.38)
        results = [f.result() for f in futs]
        assert len(results) == 6 and all(np.isfinite(r.metrics["loss:sum"]) for r in results)
        assert live.engine.run_state(tc.model_id)["pending"] == 6  # exactly once each
        assert live.engine.stats()["refused"] >= 1  # the bound was really hit
    finally:
        live.close_clients()
        live.stop()


# ------------------------------------------------------------------------------------------- full fine-tuning


def test_full_finetune_beside_lora_runs(model_dir, tmp_path):
    """A full fine-tuning run trains its own fp32 copy of every weight, in rounds shared with LoRA runs: its
    gradient is the reference cross-entropy gradient, its updates never reach the base the LoRA runs share, and
    its checkpoint resumes bitwise."""
    from flax import nnx

    rng = np.random.default_rng(7)
    toks = rng.integers(0, VOCAB, (2, 17))
    w = rng.uniform(0.5, 1.5, (2, 16)).astype(np.float32)
    data = [datum(t[:-1], t[1:], weights=wi) for t, wi in zip(toks, w)]  # two rows of 16: no padding
    with service(model_dir, tmp_path) as svc:
        full = svc.create_full_training_client("tiny", seed=0)
        lora = svc.create_lora_training_client("tiny", rank=4, seed=1)
        base = flat(nnx.to_pure_dict(worker(svc).base))
        probe_before = lora.forward(data, "cross_entropy").result().metrics["loss:sum"]
        with worker(svc).hold():
            f_out = full.forward_backward(data, "cross_entropy")
            l_out = lora.forward_backward(data, "cross_entropy")
        f_loss, l_loss = f_out.result().metrics["loss:sum"], l_out.result().metrics["loss:sum"]
        assert f_loss == pytest.approx(l_loss, rel=1e-6)  # a fresh adapter is a no-op: same model, same loss
        ref_loss, ref_grads = models_util.ce_grads(models_util.jax_model(PRESET), toks[:, :-1],
                                                   models_util.arange_positions(2, 16), toks[:, 1:], w)
        assert f_loss == pytest.approx(float(ref_loss), rel=1e-5)
        got = flat(svc.engine.run_state(full.model_id)["grads"])
        want = flat(nnx.to_pure_dict(ref_grads))
        assert set(got) == set(want) and rel(got, want) < 1e-5
        with worker(svc).hold():
            steps = [full.optim_step(ADAM), lora.optim_step(ADAM)]
        for s in steps:
            s.result()
        after = flat(svc.engine.run_state(full.model_id)["weights"])
        assert rel(after, base) > 1e-4  # the full run moved...
        for k, v in flat(nnx.to_pure_dict(worker(svc).base)).items():
            np.testing.assert_array_equal(v, base[k], err_msg=k)  # ... and the shared base did not
        assert lora.forward(data, "cross_entropy").result().metrics["loss:sum"] != probe_before  # LoRA trained

        path = full.save_state("f1").result().path
        resumed = svc.create_training_client_from_state_with_optimizer(path)
        assert not svc.engine.get_info(resumed.model_id).is_lora
        outs = [c.forward_backward(data, "cross_entropy").result().metrics["loss:sum"] for c in (full, resumed)]
        assert outs[0] == outs[1]
        for c in (full, resumed):
            c.optim_step(ADAM).result()
        a, b = (flat(svc.engine.run_state(c.model_id)["weights"]) for c in (full, resumed))
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        # Its sampler snapshot samples its own weights (sampled logprobs == its forward logprobs).
        sampler = full.save_weights_and_get_sampling_client()
        prompt = [int(t) for t in toks[0, :8]]
        seq = sampler.sample(tt.ModelInput.from_ints(prompt), 1,
                             tt.SamplingParams(max_tokens=5, temperature=1.0, seed=3, stop=[])).result().sequences[0]
        fwd = full.forward([datum(prompt + seq.tokens[:-1], prompt[1:] + seq.tokens)], "cross_entropy").result()
        np.testing.assert_allclose(logprobs(fwd)[0][len(prompt) - 1:], seq.logprobs, atol=1e-4)


def test_several_base_models_each_with_its_own_log(tmp_path):
    """Two base models in one engine: each has its own log and worker; requests to both interleave freely, and a
    hold on one does not stall the other."""
    models = {"q": str(models_util.tiny_model_dir("tiny-qwen3")), "l": str(models_util.tiny_model_dir("tiny-llama3"))}
    with tinker_jax.ServiceClient(config=EngineConfig(data_dir=tmp_path, models=models, compile_cache=False)) as svc:
        assert sorted(m.model_name for m in svc.get_server_capabilities().supported_models) == ["l", "q"]
        q = svc.create_lora_training_client("q", rank=4, seed=1)
        l_ = svc.create_lora_training_client("l", rank=4, seed=1)
        data = run_data(0, 0, "cross_entropy")
        with svc.engine._workers["q"].hold():  # q's log is held; l's keeps going
            pending = q.forward_backward(data, "cross_entropy")
            done = l_.forward_backward(data, "cross_entropy").result(timeout=120)
            assert not pending.done()
        assert np.isfinite(done.metrics["loss:sum"]) and np.isfinite(pending.result().metrics["loss:sum"])
        assert done.metrics["loss:sum"] != pending.result().metrics["loss:sum"]  # different models
        stats = svc.engine.stats()["models"]
        assert stats["q"]["micro_batches"] == stats["l"]["micro_batches"] == 1
        assert svc.engine.get_info(l_.model_id).model_data.arch == "LlamaForCausalLM"


def test_adapter_pool_slots_grow_free_and_fill_up():
    """Slots keep their contents when the pool grows; a freed slot comes back zeroed with the new run's fresh
    adapter; a full pool refuses (retryably) instead of growing past max_slots."""
    from tinker_jax.engine.pools import AdapterPool
    from tinker_jax.hf.weights import load_decoder
    from tinker_jax.models.lora import LoraSpec
    from tinker_jax.models.sharding import MeshConfig, make_mesh

    cfg = load_decoder(models_util.tiny_model_dir(PRESET)).cfg
    pool = AdapterPool(cfg, 2, make_mesh(MeshConfig()), capacity=2, max_slots=5)
    specs = [LoraSpec(2, seed=i, targets=("q", "v") if i % 2 else ("q", "k", "v", "o", "gate", "up", "down",
                                                                   "unembed")) for i in range(4)]
    slots = [pool.alloc(f"r{i}", s) for i, s in enumerate(specs[:1])]
    marked = {n: {k: v + 1.0 for k, v in ab.items()} for n, ab in pool.read(slots[0], specs[0]).weights.items()}
    pool.write(slots[0], specs[0], marked)
    first = flat(pool.read(slots[0], specs[0]).weights)
    slots += [pool.alloc(f"r{i}", s) for i, s in enumerate(specs[1:4], start=1)]  # grows 2 -> 3 -> 4 -> 5
    assert pool.capacity == 5 and sorted(slots) == [1, 2, 3, 4]
    for k, v in flat(pool.read(slots[0], specs[0]).weights).items():
        np.testing.assert_array_equal(v, first[k])  # kept through two growths
    with pytest.raises(Overloaded, match="LoRA slots"):
        pool.alloc("r4", specs[0])
    pool.free(slots[1])
    again = pool.alloc("r5", specs[3])
    assert again == slots[1]
    fresh = flat(lora_targeted_init(cfg, specs[3]))
    got = flat(pool.read(again, specs[3]).weights)
    assert set(got) == set(fresh)
    for k in got:
        np.testing.assert_array_equal(got[k], fresh[k])
    assert int(pool.count[again]) == 0 and not any(np.any(x) for x in jax.tree.leaves(pool.read_grads(again, specs[3])))


def lora_targeted_init(cfg, spec):
    from tinker_jax.models import lora as lora_math

    return lora_math.targeted(lora_math.init_adapter(cfg, spec), spec)


# ------------------------------------------------------------------------------------------- regressions (review)


def test_path_order_survives_cancellation_and_ttl_spares_a_resave(model_dir, tmp_path):
    """A cancelled request in the middle of a checkpoint path's order does not let a later one skip ahead; a TTL
    delete decided on an expired record spares the checkpoint when it was saved again meanwhile."""
    with service(model_dir, tmp_path) as svc:
        eng = svc.engine
        a = svc.create_lora_training_client("tiny", rank=4, seed=1)
        b = svc.create_lora_training_client("tiny", rank=4, seed=2)
        path = f"tinker://{a.model_id}/weights/x"
        with worker(svc).hold():
            save = a.save_state("x")
            load = b.load_state(path)
            delete = eng.delete_checkpoint(path)
            assert load._fut.cancel()  # the load never starts
        assert save.result().path == path
        assert delete.result() is True  # it ran after the save (it found the record)...
        assert eng.get_checkpoint(path) is None and not eng.checkpoint_dir(
            __import__("tinker_jax.engine.registry", fromlist=["TinkerPath"]).TinkerPath.parse(path)).exists()

        ttl_path = a.save_state("t", ttl_seconds=1).result().path
        time.sleep(1.2)
        with worker(svc).hold():
            again = a.save_state("t", overwrite=True)  # saved again, no TTL, before the expiry pass runs
            assert eng.expire_checkpoints() == [ttl_path]
        again.result()
        for _ in range(100):  # the TTL delete runs after the save and finds the record no longer expired
            if not eng.stats()["inflight"]:
                break
            time.sleep(0.05)
        assert eng.get_checkpoint(ttl_path) is not None


def test_failed_step_drops_only_its_runs_partial_gradients(model_dir, tmp_path, monkeypatch):
    """A forward_backward that fails after an earlier micro-batch of it succeeded leaves no partial gradient
    behind; a run outside the failed group keeps its accumulated gradient; a run whose earlier (successful)
    forward_backward lost its gradient gets a clear error at its next optim_step, then trains normally."""
    from tinker_jax.training import step

    with service(model_dir, tmp_path, max_tokens_per_batch=16) as svc:  # 16 tokens: one datum per micro-batch
        x = svc.create_lora_training_client("tiny", rank=4, seed=1)
        y = svc.create_lora_training_client("tiny", rank=4, seed=2)
        one = run_data(0, 0, "cross_entropy")[:1]
        two = run_data(1, 0, "cross_entropy")[:2]
        y.forward_backward(one, "cross_entropy").result()
        x.forward_backward(one, "cross_entropy").result()  # x's accumulator holds a reported-successful gradient
        y_before = flat(svc.engine.run_state(y.model_id)["grads"])
        real, calls = step.device_batch, [0]

        def flaky(*a, **k):
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("injected transfer failure")
            return real(*a, **k)

        monkeypatch.setattr(step, "device_batch", flaky)
        with pytest.raises(RuntimeError, match="injected"):
            x.forward_backward(two, "cross_entropy").result()
        monkeypatch.setattr(step, "device_batch", real)
        st = svc.engine.run_state(x.model_id)
        assert not any(np.any(g) for g in jax.tree.leaves(st["grads"])) and st["pending"] == 0
        for k, v in flat(svc.engine.run_state(y.model_id)["grads"]).items():
            np.testing.assert_array_equal(v, y_before[k])  # untouched
        with pytest.raises(RuntimeError, match="gradient accumulated since the last optim_step was dropped"):
            x.optim_step(ADAM).result()
        x.forward_backward(one, "cross_entropy").result()
        x.optim_step(ADAM).result()  # and then it trains normally
        y.optim_step(ADAM).result()


def test_load_keeps_the_checkpoint_alpha_in_later_saves(model_dir, tmp_path):
    """A run created from a checkpoint trained with alpha 32 keeps alpha 32 (its scale) even where the server's
    default alpha is 16, and so do the checkpoints it saves afterwards."""
    from tinker_jax.engine import checkpoints
    from tinker_jax.engine.registry import TinkerPath

    with service(model_dir, tmp_path / "a") as svc:
        path = svc.create_lora_training_client("tiny", rank=4, seed=1).save_state("s").result().path
    cfg = EngineConfig.from_dict({"data_dir": str(tmp_path / "a"), "models": {"tiny": str(model_dir)},
                                  "compile_cache": False, "lora": {"alpha": 16}})
    with tinker_jax.ServiceClient(config=cfg) as svc:
        tc = svc.create_training_client_from_state(path)
        assert svc.engine.run_state(tc.model_id)["spec"].alpha == 32
        again = tc.save_state("s2").result().path
        meta = checkpoints.read_meta(svc.engine.checkpoint_dir(TinkerPath.parse(again)))
        assert meta["lora_alpha"] == 32


def test_non_finite_target_tokens_and_adapters_are_refused(model_dir, tmp_path):
    """Fractional or NaN target ids are the client's mistake (a UserError naming the field), and an adapter with
    NaN weights is refused by the sampler rather than reaching other rows of a shared decode call."""
    from tinker_jax.models.lora import Adapter
    from tinker_jax.sampling.snapshot import WeightSnapshot

    bad = tt.Datum(model_input=tt.ModelInput.from_ints([1, 2, 3]),
                   loss_fn_inputs={"target_tokens": tt.TensorData.from_numpy(np.array([2.7, np.nan, 4.0],
                                                                                       np.float32))})
    with service(model_dir, tmp_path) as svc:
        tc = svc.create_lora_training_client("tiny", rank=4, seed=1)
        with pytest.raises(UserError, match=r"datum\[0\]\.loss_fn_inputs\['target_tokens'\]: must be whole"):
            tc.forward_backward([bad], "cross_entropy").result()
        good = tc.save_weights_and_get_sampling_client()
        snap = svc.engine._snapshot(good.sampler_id)
        poisoned = jax.tree.map(lambda x: x * np.nan, snap.adapter.weights)
        sid = svc.engine._register_snapshot(WeightSnapshot(snap.cfg, snap.graphdef, snap.params,
                                                           Adapter(snap.adapter.spec, poisoned), "nan", "tiny"))
        prompt = tt.ModelInput.from_ints([5, 6, 7])
        params = tt.SamplingParams(max_tokens=4, seed=1)
        with worker(svc).hold():
            nan_fut = svc.engine.sample(sid, prompt, 1, params)
            ok_fut = good.sample(prompt, 1, params)
        with pytest.raises(UserError, match="NaN or inf"):
            nan_fut.result(timeout=60)
        assert np.all(np.isfinite(ok_fut.result(timeout=60).sequences[0].logprobs))


def test_a_failed_model_load_is_reported_without_paths_and_retried(model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, broken / f.name)  # config and tokenizer, but no weights
    with tinker_jax.ServiceClient(config=EngineConfig(data_dir=tmp_path / "d", models={"m": str(broken)},
                                                      compile_cache=False)) as svc:
        with pytest.raises(RuntimeError, match="could not be loaded") as err:
            svc.create_lora_training_client("m", rank=4)
        assert str(tmp_path) not in str(err.value)  # the server log has the details, the client no paths
        for f in model_dir.glob("*.safetensors"):
            shutil.copy(f, broken / f.name)
        tc = svc.create_lora_training_client("m", rank=4)  # the next request loads it again
        assert np.isfinite(tc.forward(run_data(0, 0, "cross_entropy"), "cross_entropy").result().metrics["loss:sum"])


def test_a_request_without_an_optional_input_keeps_its_default_in_a_shared_batch(model_dir, tmp_path):
    """A request that leaves out an optional input (cross_entropy's weights, ppo's per-token clip thresholds) reads
    its loss's default for it even in a micro-batch with a request that gives it: it read the batch's zeros (a
    cross_entropy loss of 0 and no gradient; ppo clipped at 0)."""
    def bare(data, keep=()):
        return [tt.Datum(model_input=d.model_input, loss_fn_inputs={k: v for k, v in d.loss_fn_inputs.items()
                                                                     if k == "target_tokens" or k in keep})
                for d in data]

    ce = run_data(0, 0, "cross_entropy")
    rl = run_data(1, 0, "ppo")
    clipped = [tt.Datum(model_input=d.model_input, loss_fn_inputs={
        **d.loss_fn_inputs, "clip_low_threshold": tt.TensorData.from_numpy(np.full(len(d.model_input.to_ints()),
                                                                                   0.5, np.float32))}) for d in rl]
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    with service(model_dir, tmp_path) as svc:
        a = svc.create_lora_training_client("tiny", rank=4, seed=1)
        b = svc.create_lora_training_client("tiny", rank=4, seed=2)
        alone = [b.forward(bare(ce), "cross_entropy").result().metrics,
                 b.forward(rl, "ppo", config).result().metrics]
        w = worker(svc)
        with w.hold():
            futs = [a.forward(ce, "cross_entropy"), b.forward(bare(ce), "cross_entropy"),
                    a.forward(clipped, "ppo", config), b.forward(rl, "ppo", config)]
        shared = [futs[1].result().metrics, futs[3].result().metrics]
        assert svc.engine.stats()["models"]["tiny"]["max_requests_per_batch"] == 4
    assert alone[0]["loss:sum"] != 0
    for x, y in zip(shared, alone):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-5), k
