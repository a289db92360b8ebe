"""Ours, weight handoff: time from asking for sampler weights to the first sampled token.

Before each timed run one untimed forward_backward + optim_step changes the weights (as an RL step would).
- "in memory": save_weights_and_get_sampling_client() then sample(max_tokens=1).
- "via path": save_weights_for_sampler(name) (writes a sampler checkpoint), create_sampling_client(model_path=...),
  then sample(max_tokens=1): what a client in another process does with the path.
Each step returns its own timed seconds (the untimed training step excluded).
"""

from __future__ import annotations

import itertools
import time
from typing import Callable

import numpy as np

from benchmarks.data import datums, model_input


def handoff_steps(sc, base_model: str, tokens: np.ndarray, prompt: np.ndarray, *, lora_rank: int
                  ) -> tuple[dict[str, Callable[[], float]], Callable[[], None]]:
    import tinker.types as tt

    tc = sc.create_lora_training_client(base_model, rank=lora_rank, seed=0, train_unembed=False)
    data, inp = datums(tokens), model_input(prompt)
    params = tt.SamplingParams(max_tokens=1, temperature=0.0, seed=0)
    adam = tt.AdamParams(learning_rate=1e-5)
    names = (f"bench-handoff-{i}" for i in itertools.count())

    def train_step():
        fb, opt = tc.forward_backward(data, "cross_entropy"), tc.optim_step(adam)
        fb.result(), opt.result()

    def in_memory() -> float:
        train_step()
        t0 = time.perf_counter()
        s = tc.save_weights_and_get_sampling_client()
        s.sample(inp, 1, params).result()
        dt = time.perf_counter() - t0
        sc.engine.release_sampler(s.sampler_id)
        return dt

    def via_path() -> float:
        train_step()
        t0 = time.perf_counter()
        path = tc.save_weights_for_sampler(next(names)).result().path
        s = sc.create_sampling_client(model_path=path)
        s.sample(inp, 1, params).result()
        dt = time.perf_counter() - t0
        sc.engine.release_sampler(s.sampler_id)
        return dt

    return {"in_memory": in_memory, "via_path": via_path}, lambda: sc.engine.unload_model(tc.model_id)
