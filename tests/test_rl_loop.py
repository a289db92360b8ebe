"""Done-when of the sampling issue: an RL loop through tinker_jax.ServiceClient raises a learnable reward.

Each step: a fresh sampler from the current weights, sample a group per prompt, reward = fraction of
sampled tokens from a fixed small set, group-centred advantages, importance_sampling forward_backward with
the sampler's logprobs, optim_step. The mean reward over the last steps must beat the first steps'.
"""

import dataclasses

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


def _provenance_datum(prompt, s, advantage):
    """A rollout as tinker-cookbook's rl_loop sends it to stable_reinforce: placeholder prompt targets, the
    client's logprobs padded with zeros, and spans naming the sampled sequence on both fields."""
    ob, toks = len(prompt) - 1, list(s.tokens)
    d = tt.Datum(model_input=tt.ModelInput.from_ints(prompt + toks[:-1]), loss_fn_inputs={
        "target_tokens": [0] * ob + toks, "logprobs": [0.0] * ob + list(s.logprobs),
        "advantages": [0.0] * ob + [advantage] * len(toks)})
    return d.with_provenance(
        model_input=[tt.PromptProvenanceSpan(sequence_id=s.sequence_id, length=len(prompt)),
                     tt.SampledProvenanceSpan(sequence_id=s.sequence_id, length=len(toks) - 1)],
        loss_fn_inputs=[tt.PromptProvenanceSpan(sequence_id=s.sequence_id, offset=1, length=len(prompt) - 1),
                        tt.SampledProvenanceSpan(sequence_id=s.sequence_id, length=len(toks))])


def test_stable_reinforce_trains_on_the_recorded_samples(service):
    """On policy the loss is -sum(A * lp) over sampled tokens (ratio 1, the sampler's logprobs equal the
    trainer's); after a step the same rollouts are off policy and the loss is our documented objective computed
    from the recorded sampler logprobs and the trainer's new ones. A sampler that did not record, and a target
    that is not the sampled token, are refused naming the field."""
    tc = service.create_lora_training_client("small", rank=16, seed=1)  # the rank above: its programs
    prompt = tc.get_tokenizer().encode("The weather today is")
    params = tt.SamplingParams(max_tokens=6, temperature=1.0, seed=3, stop=[])
    seqs = tc.save_weights_and_get_sampling_client(record_stability_info=True).sample(
        tt.ModelInput.from_ints(prompt), 4, params).result().sequences
    advs = [1.0, -0.5, 0.25, -0.75]
    data = [_provenance_datum(prompt, s, a) for s, a in zip(seqs, advs)]
    n_ob = len(prompt) - 1

    def check(out, clip=2.0):
        loss = 0.0
        for s, a, o in zip(seqs, advs, out.loss_fn_outputs):
            lp = np.asarray(o["logprobs"].data, np.float64)[n_ob:]
            ratio = np.exp(lp - np.asarray(s.logprobs, np.float64))
            loss += float(np.sum(-np.minimum(ratio, clip) * a * lp))
        np.testing.assert_allclose(out.metrics["loss:sum"], loss, rtol=1e-5)

    first = tc.forward_backward(data, "stable_reinforce").result()
    check(first)
    assert first.metrics["clipped_tokens:sum"] == 0 and first.metrics["kl_to_sampler:sum"] < 1e-4
    tc.optim_step(tt.AdamParams(learning_rate=5e-2)).result()
    later = tc.forward(data, "stable_reinforce", {"clip_high_threshold": 1.05}).result()
    check(later, clip=1.05)
    assert later.metrics["kl_to_sampler:sum"] > 1e-4  # the weights moved: off policy now

    plain = tc.save_weights_and_get_sampling_client().sample(tt.ModelInput.from_ints(prompt), 1, params).result()
    with pytest.raises(Exception, match=r"datum\[0\]\.loss_fn_input_spans\[0\]\.sequence_id: no recorded sample"):
        tc.forward_backward([_provenance_datum(prompt, plain.sequences[0], 1.0)], "stable_reinforce").result()
    bad = _provenance_datum(prompt, seqs[0], 1.0)
    targets = [0] * n_ob + [(t + 1) % 8192 for t in seqs[0].tokens]
    bad = dataclasses.replace(bad, loss_fn_inputs=dict(bad.loss_fn_inputs, target_tokens=tt.TensorData(
        data=targets, dtype="int64", shape=[len(targets)])))
    with pytest.raises(Exception, match=r"datum\[0\]\.loss_fn_inputs\['target_tokens'\]\[\d+\] is \d+ but"):
        tc.forward_backward([bad], "stable_reinforce").result()
