"""Ours, sampling: decode tokens/s through SamplingClient.sample.

A batch of B distinct prompts is B `sample` requests (num_samples=1) submitted at once, greedy
(temperature 0), max_tokens new tokens each; tokens/s counts the tokens actually returned (a row may stop early
at EOS) over the wall time until every result is back (prefill included, as for the `generate` peer).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from benchmarks.data import model_input


def sample_step(sc, base_model: str, prompts: np.ndarray, max_new: int
                ) -> tuple[Callable[[], int], Callable[[], None]]:
    """-> (one batch: returns the number of tokens generated, release)."""
    import tinker.types as tt

    sampler = sc.create_sampling_client(base_model=base_model)
    params = tt.SamplingParams(max_tokens=max_new, temperature=0.0, seed=0)
    inputs = [model_input(p) for p in prompts]

    def run() -> int:
        futs = [sampler.sample(inp, 1, params) for inp in inputs]
        return sum(len(s.tokens) for f in futs for s in f.result().sequences)
    return run, lambda: sc.engine.release_sampler(sampler.sampler_id)
