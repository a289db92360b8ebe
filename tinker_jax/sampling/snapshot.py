"""The one snapshot type: the immutable weights a sampling request names.

A snapshot is the decoder's weights (`graphdef`, `params`) plus, for a LoRA run, an `Adapter` over them:
- a base model: the base weights, no adapter;
- a LoRA run: the *base model's* params (shared, never copied) and a private copy of the run's adapter;
- a full fine-tuning run: a private copy of every weight.
Samplers batch rows of every snapshot that shares one `params` object in the same device call (each row with its
own adapter); snapshots with their own params (full fine-tuning) decode in calls of their own.
Kernels take params as jit arguments (the graphdef is static), so the next snapshot of the same shapes reuses
the compiled programs. Snapshots are never written: later optimizer steps cannot change what a sampler samples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from flax import nnx

from tinker_jax.models.config import ModelConfig
from tinker_jax.models.decoder import Decoder, StaticGraph, merge
from tinker_jax.models.lora import Adapter

_ids = itertools.count()


@dataclass(frozen=True, eq=False)  # identity semantics: two snapshots are the same only if they are one object
class WeightSnapshot:
    cfg: ModelConfig
    graphdef: Any  # a Decoder's nnx.GraphDef, as a StaticGraph (a static jit argument hashed once)
    params: nnx.State  # every nnx.Param the decoder runs with
    adapter: Adapter | None = None  # LoRA over `params`
    name: str = ""  # e.g. the tinker path it was saved under
    base_model: str = ""
    uid: int = field(default_factory=lambda: next(_ids))
    origin: int | None = None  # several processes: the request (its place in the worker's log) that made it

    @property
    def kind(self) -> str:
        return "lora" if self.adapter is not None else "weights"

    def model(self) -> Decoder:
        """The Decoder of these params (without the adapter; for reference computations and tests)."""
        return merge(self.graphdef, self.params)


def snapshot_of(decoder: Decoder, adapter: Adapter | None = None, name: str = "", base_model: str = "",
                params: nnx.State | None = None) -> WeightSnapshot:
    """A snapshot of `decoder`'s weights (arrays are immutable; nothing is copied), optionally with an adapter.
    Pass `params` to share one params object between snapshots (what lets samplers batch them together)."""
    graphdef, state = nnx.split(decoder, nnx.Param)
    return WeightSnapshot(decoder.cfg, StaticGraph(graphdef), state if params is None else params, adapter, name,
                          base_model)
