"""Conformance scenarios against a running tinker-jax server, written only with the public SDK API that both the
oldest protobuf-era SDK (0.25) and the newest (0.38) have.

`tests/test_conformance.py` calls these in-process with SDK 0.38, and runs this file as a script under
`.venv-sdk025/bin/python` (SDK 0.25) when that venv exists:

    python tests/test_conformance_scenarios.py BASE_URL API_KEY BASE_MODEL [--sampling]

which prints one JSON object with what each scenario observed. This module imports nothing from the project
(the SDK 0.25 venv has only `tinker` and numpy) and defines no tests itself.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from typing import Any

import numpy as np
import tinker
from tinker import types

SEQ_LEN = 12  # every training datum has this many input tokens: one length bucket, few compilations
N_DATUMS = 4


def sft_datums(seed: int = 0, n: int = N_DATUMS, low: int = 10, high: int = 200) -> list[types.Datum]:
    """Fixed random sequences; next-token targets (model_input = seq[:-1], target_tokens = seq[1:])."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seq = rng.integers(low, high, size=SEQ_LEN + 1)
        out.append(types.Datum(
            model_input=types.ModelInput.from_ints([int(t) for t in seq[:-1]]),
            loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(seq[1:].astype(np.int64)),
                            "weights": types.TensorData.from_numpy(np.ones(SEQ_LEN, np.float32))}))
    return out


def logprobs_of(out: types.ForwardBackwardOutput) -> list[list[float]]:
    return [np.asarray(o["logprobs"].data, np.float32).tolist() for o in out.loss_fn_outputs]


def scenario_sft(service: Any, base_model: str, steps: int = 5, lr: float = 1e-2) -> dict[str, Any]:
    """Supervised loop: forward_backward + optim_step submitted back to back; the loss goes down."""
    tc = service.create_lora_training_client(base_model=base_model, rank=4, seed=0)  # deterministic
    info = tc.get_info()
    data = sft_datums()
    losses = []
    for _ in range(steps):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=lr))  # pipelined: submitted before fb's result
        losses.append(float(fb.result().metrics["loss:sum"]))
        opt.result()
    fwd = tc.forward(data, "cross_entropy").result()
    return {"training_client": tc, "model_id": tc.model_id, "model_name": info.model_data.model_name,
            "losses": losses, "forward_loss": float(fwd.metrics["loss:sum"]),
            "forward_logprob_lengths": [len(x) for x in logprobs_of(fwd)]}


def scenario_resume(service: Any, tc: Any, name: str) -> dict[str, Any]:
    """save_state, then a new training client from that path with its optimizer state: same weights, and it
    keeps training."""
    data = sft_datums()
    path = tc.save_state(name).result().path
    before = logprobs_of(tc.forward(data, "cross_entropy").result())
    resumed = service.create_training_client_from_state_with_optimizer(path)
    after = logprobs_of(resumed.forward(data, "cross_entropy").result())
    fb = resumed.forward_backward(data, "cross_entropy")
    resumed.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return {"path": path, "resumed_model_id": resumed.model_id, "training_client": resumed,
            "max_logprob_diff": float(max(np.max(np.abs(np.subtract(a, b))) for a, b in zip(before, after))),
            "resumed_loss": float(fb.result().metrics["loss:sum"])}


def scenario_sampling(service: Any, tc: Any, base_model: str) -> dict[str, Any]:
    """An ephemeral sampler of the trained weights (logprobs per token) and a base-model sampler
    (compute_logprobs)."""
    sampler = tc.save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints([11, 12, 13, 14, 15])
    resp = sampler.sample(prompt, num_samples=2, sampling_params=types.SamplingParams(
        max_tokens=6, temperature=1.0, seed=1)).result()
    seqs = [{"tokens": list(s.tokens), "n_logprobs": len(s.logprobs or []), "stop_reason": s.stop_reason}
            for s in resp.sequences]
    base = service.create_sampling_client(base_model=base_model)
    prompt_lps = base.compute_logprobs(prompt).result()
    return {"sequences": seqs, "prompt_logprobs": [None if x is None else float(x) for x in prompt_lps]}


def scenario_rl(tc: Any, steps: int = 2) -> dict[str, Any]:
    """RL: sample from the current weights, advantages from a toy reward (count of even tokens), an
    importance_sampling forward_backward with the sampler's logprobs, optim_step, a new sampler each step."""
    prompts = [[21, 22, 23, 24], [31, 32, 33, 34]]
    rewards_per_step = []
    for _ in range(steps):
        sampler = tc.save_weights_and_get_sampling_client()
        data, rewards = [], []
        futures = [sampler.sample(types.ModelInput.from_ints(p), num_samples=2,
                                  sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0))
                   for p in prompts]
        for p, fut in zip(prompts, futures):
            group = fut.result().sequences
            rs = [float(sum(t % 2 == 0 for t in s.tokens)) for s in group]
            mean = sum(rs) / len(rs)
            for s, r in zip(group, rs):
                tokens = p + list(s.tokens)
                n = len(tokens) - 1
                prompt_part = len(p) - 1
                logprobs = [0.0] * prompt_part + list(s.logprobs)
                adv = [0.0] * prompt_part + [r - mean] * len(s.tokens)
                data.append(types.Datum(
                    model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={
                        "target_tokens": types.TensorData.from_numpy(np.asarray(tokens[1:], np.int64)),
                        "logprobs": types.TensorData.from_numpy(np.asarray(logprobs[:n], np.float32)),
                        "advantages": types.TensorData.from_numpy(np.asarray(adv[:n], np.float32))}))
            rewards.extend(rs)
        fb = tc.forward_backward(data, "importance_sampling")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        assert "loss:sum" in fb.result().metrics
        rewards_per_step.append(sum(rewards) / len(rewards))
    return {"mean_reward_per_step": rewards_per_step}


def scenario_errors(tc: Any) -> dict[str, Any]:
    """Bad requests fail their own future with RequestFailedError (category user); the model keeps working."""
    errors = {}
    bad = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 10**6]),
                      loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array([2, 3, 4], np.int64)),
                                      "weights": types.TensorData.from_numpy(np.ones(3, np.float32))})
    mismatched = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                             loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array([2, 3], np.int64))})
    for label, data, loss in (("token_out_of_range", [bad], "cross_entropy"),
                              ("mismatched_inputs", [mismatched], "cross_entropy"),
                              ("unknown_loss", sft_datums(), "no_such_loss")):
        try:
            tc.forward_backward(data, loss).result()
            errors[label] = None
        except tinker.RequestFailedError as e:
            errors[label] = {"category": str(getattr(e.category, "value", e.category)), "message": e.message}
    ok = tc.forward(sft_datums(), "cross_entropy").result()
    return {"errors": errors, "still_works": "loss:sum" in ok.metrics}


def scenario_rest(service: Any, run_id: str, keep_path: str, delete_name: str, tc: Any) -> dict[str, Any]:
    """List a run's checkpoints and the user's, read the run, delete one checkpoint."""
    rest = service.create_rest_client()
    doomed = tc.save_state(delete_name).result().path
    listed = [c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints]
    user = [c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints]
    run = rest.get_training_run(run_id).result()
    rest.delete_checkpoint_from_tinker_path(doomed).result()
    after = [c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints]
    return {"listed": listed, "user": user, "run_base_model": run.base_model, "run_is_lora": run.is_lora,
            "deleted": doomed, "after_delete": after, "kept": keep_path}


def main(argv: list[str]) -> int:
    base_url, api_key, base_model = argv[:3]
    sampling = "--sampling" in argv
    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    t0 = time.time()
    out: dict[str, Any] = {"sdk_version": tinker.__version__}
    sft = scenario_sft(service, base_model)
    tc = sft.pop("training_client")
    out["sft"] = sft
    resume = scenario_resume(service, tc, "sdk-old-ckpt")
    resume.pop("training_client")
    out["resume"] = resume
    out["errors"] = scenario_errors(tc)
    out["rest"] = scenario_rest(service, sft["model_id"], resume["path"], "sdk-old-doomed", tc)
    if sampling:
        out["sampling"] = scenario_sampling(service, tc, base_model)
        out["rl"] = scenario_rl(tc, steps=1)
    out["seconds"] = time.time() - t0
    print(json.dumps(out))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    # CI's run of 2026-12-07 (stop 26): this script printed every scenario's result and then died with SIGABRT and
    # an empty stderr, i.e. in the interpreter's teardown, in a native thread of the SDK's stack (glibc writes its
    # abort message to the tty, not to stderr). 25 runs here did not reproduce it. The scenarios' results are all
    # printed and flushed by then and nothing the test checks depends on the SDK's teardown, so the script ends
    # without one; faulthandler (and LIBC_FATAL_STDERR_, set by the test) make an abort before that point say where.
    faulthandler.enable()
    status = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
