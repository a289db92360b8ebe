"""Ours, training: tokens/s of forward_backward + optim_step through tinker_jax.ServiceClient.

One step = forward_backward(cross_entropy) and optim_step submitted back to back (as a Tinker script does), timed
until both results are back. LoRA: rank r on attention and MLP (train_unembed=False, like peft's q/k/v/o/gate/up/
down targets; alpha is Tinker's fixed 32; the "moe" section passes train_unembed=True, the SDK's default, against
peft's targets + lm_head). Full fine-tuning: create_full_training_client.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from benchmarks.data import datums


def train_step(sc, base_model: str, tokens: np.ndarray, *, lora_rank: int | None, capture: dict | None = None,
               train_unembed: bool = False) -> tuple[Callable[[], None], Callable[[], None]]:
    """-> (one training step, release the model).

    capture: if given, the first step stores its forward_backward logprobs there (under "logprobs", one array
    per datum): computed before any optim_step, from the seeded adapters, so two engines can be compared."""
    import tinker.types as tt

    data = datums(tokens)
    if lora_rank:
        tc = sc.create_lora_training_client(base_model, rank=lora_rank, seed=0, train_unembed=train_unembed)
    else:
        tc = sc.create_full_training_client(base_model, seed=0)
    adam = tt.AdamParams(learning_rate=1e-5)

    def step():
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(adam)
        out = fb.result()
        opt.result()
        if capture is not None and "logprobs" not in capture:
            capture["logprobs"] = [np.asarray(o["logprobs"].to_numpy()) for o in out.loss_fn_outputs]
    return step, lambda: sc.engine.unload_model(tc.model_id)
