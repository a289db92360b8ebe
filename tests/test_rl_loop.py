"""Done-when of the sampling issue: an RL loop through tinker_jax.ServiceClient raises a learnable reward.

Each step: a fresh sampler from the current weights, sample a group per prompt, reward = fraction of
sampled tokens from a fixed small set, group-centred advantages, importance_sampling forward_backward with
the sampler's logprobs, optim_step. The mean reward over the last steps must beat the first steps'.
"""

import numpy as np
import pytest
import tinker.types as tt

import tinker_jax
from tinker_jax.config import EngineConfig, SamplerConfig
from tinker_jax.hf.init_model import init_model

GOOD = set(range(0, 2048))  # the reward's token set: a quarter of the 8192 ids
MAX_TOKENS = 8
GROUP = 8


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    model = init_model(root / "small-qwen3", "small-qwen3", seed=0)
    cfg = EngineConfig(data_dir=root / "data", models={"small": str(model)},
                       sampler=SamplerConfig(max_batch=16, max_seq_len=64))
    sc = tinker_jax.ServiceClient(config=cfg)
    yield sc
    sc.close()


def reward(tokens) -> float:
    return float(np.mean([t in GOOD for t in tokens])) if len(tokens) else 0.0


def test_rl_importance_sampling_raises_reward(service):
    tc = service.create_lora_training_client("small", rank=16, seed=0)
    tok = tc.get_tokenizer()
    prompts = [tok.encode(p) for p in ("The weather today is", "Two plus two equals")]
    means = []
    for step in range(30):
        sampler = tc.save_weights_and_get_sampling_client()
        params = tt.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=step, stop=[])
        futs = [sampler.sample(tt.ModelInput.from_ints(p), GROUP, params) for p in prompts]
        data, rewards = [], []
        for p, fut in zip(prompts, futs):
            seqs = fut.result().sequences
            r = np.array([reward(s.tokens) for s in seqs])
            rewards.extend(r)
            adv = r - r.mean()
            for s, a in zip(seqs, adv):
                n_prompt, toks = len(p), list(s.tokens)
                full = p + toks
                # Targets are the next tokens; only sampled positions carry logprobs and advantages.
                logprobs = [0.0] * (n_prompt - 1) + list(s.logprobs)
                advs = [0.0] * (n_prompt - 1) + [float(a)] * len(toks)
                data.append(tt.Datum(model_input=tt.ModelInput.from_ints(full[:-1]), loss_fn_inputs={
                    "target_tokens": full[1:], "logprobs": logprobs, "advantages": advs}))
        means.append(float(np.mean(rewards)))
        tc.forward_backward(data, "importance_sampling")
        tc.optim_step(tt.AdamParams(learning_rate=2e-2)).result()
    first, last = np.mean(means[:5]), np.mean(means[-5:])
    assert last > first + 0.15, f"mean reward did not rise: first steps {means[:5]}, last steps {means[-5:]}"
