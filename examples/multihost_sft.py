"""The in-process API on several processes (hosts): run this same script on every process.

    python scripts/local_cluster.py -n 2 --devices 4 -- python examples/multihost_sft.py MODEL_DIR DATA_DIR

(on a TPU pod slice or SLURM: run it on every host with `distributed: {from_env: true}` in the config instead).
Every process makes the same calls in the same order; process 0 decides what runs, every process runs it on its
share of the one global mesh (fsdp=2 x tensor=4 over the 8 devices of 2 processes here), and every process gets the
same results. It prints one JSON line per process: the losses and logprobs of a short SFT loop, the last gradient
norm, a forward loss, what comes back from a checkpoint (saved by every process, reloaded into the run and into a
second run), samples of the trained weights (greedy, seeded, and a conversation's next turn, whose earlier pages
come from the prefix cache), and an RL step on the seeded samples. Run alone with 8
devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), the same script is the single-process reference.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tinker.types as tt

import tinker_jax
from tinker_jax.config import EngineConfig
from tinker_jax.models.sharding import MeshConfig


def batch(step: int) -> list[tt.Datum]:
    rng = np.random.default_rng(step)
    out = []
    for n in (9, 13, 6, 11):  # ragged rows: padding and the row split over fsdp are exercised
        toks = rng.integers(0, 512, n)
        out.append(tt.Datum(model_input=tt.ModelInput.from_ints(toks[:-1].tolist()),
                            loss_fn_inputs={"target_tokens": tt.TensorData.from_numpy(toks[1:].astype(np.int64)),
                                            "weights": tt.TensorData.from_numpy(np.ones(n - 1, np.float32))}))
    return out


def main(model_dir: str, data_dir: str) -> None:
    config = EngineConfig(data_dir=data_dir, models={"tiny": model_dir}, mesh=MeshConfig(fsdp=2, tensor=4),
                          max_seq_len=64, compile_cache=False)
    with tinker_jax.ServiceClient(config=config) as service:
        tc = service.create_lora_training_client(base_model="tiny", rank=4, seed=7)
        losses, logprobs = [], None
        for step in range(3):
            fb = tc.forward_backward(batch(step), "cross_entropy").result()
            losses.append(fb.metrics["loss:sum"])
            logprobs = [o["logprobs"].tolist() for o in fb.loss_fn_outputs]
            opt = tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
        fwd = tc.forward(batch(99), "cross_entropy").result()
        # A checkpoint: every process writes its own shards; process 0 commits once all are written.
        saved = tc.save_state("final").result().path
        tc.forward_backward(batch(5), "cross_entropy").result()  # move on, then come back to the checkpoint
        tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
        tc.load_state_with_optimizer(saved).result()
        reloaded = tc.forward(batch(99), "cross_entropy").result()
        # A second run from the same checkpoint (each process reads the shards it holds)
        resumed = service.create_training_client_from_state_with_optimizer(saved)
        resumed.forward_backward(batch(3), "cross_entropy").result()
        resumed_opt = resumed.optim_step(tt.AdamParams(learning_rate=1e-2)).result()
        # Sampling over the mesh: greedy, and seeded at temperature 1 (two samples of one prompt)
        sampler = tc.save_weights_and_get_sampling_client("sampler")
        prompt = tt.ModelInput.from_ints([5, 17, 42, 7, 99])
        greedy = sampler.sample(prompt, 1, tt.SamplingParams(max_tokens=6, temperature=0.0)).result()
        seeded = sampler.sample(prompt, 2, tt.SamplingParams(max_tokens=6, temperature=1.0, seed=11)).result()
        # A conversation's next turn: turn 2 sends turn 1's prompt and answer back with 2 more tokens; the full KV
        # pages of both (2 of 16 tokens) come from the prefix cache, and only the rest is prefilled.
        first = tt.ModelInput.from_ints(list(range(3, 23)))
        one = sampler.sample(first, 1, tt.SamplingParams(max_tokens=14, temperature=0.0, stop=[])).result()
        turn = tt.ModelInput.from_ints(first.to_ints() + list(one.sequences[0].tokens) + [5, 6])
        two = sampler.sample(turn, 1, tt.SamplingParams(max_tokens=4, temperature=0.0, stop=[])).result()
        samples = [{"tokens": q.tokens, "logprobs": q.logprobs}
                   for q in greedy.sequences + seeded.sequences + one.sequences + two.sequences]
        # An RL step on the seeded samples: importance sampling against the sampler's logprobs, one up, one (less) down
        rl = []
        for q, advantage in zip(seeded.sequences, (1.0, -0.5)):
            tokens, n_prompt = prompt.to_ints() + list(q.tokens), prompt.length - 1
            rl.append(tt.Datum(model_input=tt.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
                "target_tokens": tt.TensorData.from_numpy(np.array(tokens[1:], np.int64)),
                "logprobs": tt.TensorData.from_numpy(np.array([0.0] * n_prompt + list(q.logprobs), np.float32)),
                "advantages": tt.TensorData.from_numpy(
                    np.array([0.0] * n_prompt + [advantage] * len(q.tokens), np.float32))}))
        rl_loss = tc.forward_backward(rl, "importance_sampling").result().metrics["loss:sum"]
        rl_norm = tc.optim_step(tt.AdamParams(learning_rate=1e-2)).result().metrics["grad_norm:mean"]
        import jax

        print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(), "model_id": tc.model_id,
                          "losses": losses, "logprobs": logprobs, "grad_norm": opt.metrics["grad_norm:mean"],
                          "forward_loss": fwd.metrics["loss:sum"], "checkpoint": saved,
                          "reloaded_loss": reloaded.metrics["loss:sum"],
                          "resumed_grad_norm": resumed_opt.metrics["grad_norm:mean"], "samples": samples,
                          "rl": [rl_loss, rl_norm],
                          # the seeded request found the greedy one's prompt in the prefix cache (no prefill)
                          "prompt_cache_hits": service.engine.stats()["models"]["tiny"]["sampler"].get(
                              "prompt_cache_hits", 0),
                          "next_turn_cached_tokens": two.prompt_cache_hit_tokens}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
