"""Sampling: continuous-batching generation over immutable weight snapshots.

- `snapshot.py`: WeightSnapshot, the one snapshot type (base params, optionally a LoRA adapter).
- `params.py`: SamplingParams validation and processing (ValueError names the field).
- `kernels.py`: jitted prefill / decode / cache-row insertion / token selection.
- `stops.py`: stop-string detection during generation.
- `response.py`: SampleResponse assembly.
- `scheduler.py`: the Sampler (background thread, continuous batching).
- `factory.py`: make_sampler(base, config): a started Sampler with the model's EOS ids and tokenizer.
"""

from tinker_jax.sampling.factory import make_sampler
from tinker_jax.sampling.params import Limits, RequestSpec, validate_request
from tinker_jax.sampling.scheduler import Sampler
from tinker_jax.sampling.snapshot import WeightSnapshot, snapshot_of

__all__ = ["Limits", "RequestSpec", "Sampler", "WeightSnapshot", "make_sampler", "snapshot_of", "validate_request"]
