"""Done-when: supervised fine-tuning through tinker_jax.ServiceClient on the small-qwen3 preset (~29M params,
fresh random weights, trained tokenizer) halves the training NLL of a fixed small dataset within 30 steps."""

from __future__ import annotations

import math

import numpy as np
import tinker.types as tt

import tinker_jax
from tinker_jax.config import EngineConfig
from tinker_jax.hf.init_model import init_model

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be or not to be, that is the question.",
    "All that glitters is not gold.",
    "The early bird catches the worm.",
    "Actions speak louder than words.",
    "Knowledge is power.",
    "Where there is a will, there is a way.",
    "Practice makes perfect.",
    "Time flies when you are having fun.",
    "Every cloud has a silver lining.",
    "Better late than never.",
]


def test_sft_small_qwen3_halves_training_nll(tmp_path):
    model_dir = init_model(tmp_path / "small-qwen3", "small-qwen3", seed=0)
    with tinker_jax.ServiceClient(data_dir=tmp_path / "data",
                                  config=EngineConfig(models={"small-qwen3": str(model_dir)})) as svc:
        tc = svc.create_lora_training_client("small-qwen3", rank=32, seed=0)
        tok = tc.get_tokenizer()
        data, n_tokens = [], 0
        for s in SENTENCES:
            ids = tok.encode(s)
            assert 4 <= len(ids) <= 17 and tok.decode(ids) == s
            data.append(tt.Datum(model_input=tt.ModelInput.from_ints(ids[:-1]),
                                 loss_fn_inputs={"target_tokens": tt.TensorData.from_numpy(
                                     np.asarray(ids[1:], np.int64))}))
            n_tokens += len(ids) - 1

        nll = []  # per-token training NLL of the current weights (forward_backward runs before each update)
        for step in range(31):  # NLL after 0..30 optimizer steps
            out = tc.forward_backward(data, "cross_entropy").result()
            nll.append(out.metrics["loss:sum"] / n_tokens)
            if nll[-1] <= 0.5 * nll[0] or step == 30:
                break
            tc.optim_step(tt.AdamParams(learning_rate=5e-3)).result()
        # An untrained model is near uniform over the 8192-token vocabulary ...
        assert abs(nll[0] - math.log(8192)) < 1.0, nll[0]
        # ... and training at least halves its NLL within 30 steps.
        assert nll[-1] <= 0.5 * nll[0], nll
        assert all(np.isfinite(nll))
