"""Weight snapshots: the immutable (graphdef, frozen, trainable) triple a sampling request names.

Kernels take the two states as jit *arguments* (the graphdef is a static argument), so a new snapshot with
the same structure and shapes -- the next LoRA or full fine-tuning step -- reuses the compiled programs.
Frozen and trainable stay separate so that per-row adapters (a batch mixing snapshots that share `frozen`)
can be added later without changing this contract.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import jax
from flax import nnx

from tinker_jax.models.config import ModelConfig
from tinker_jax.models.decoder import Decoder

_ids = itertools.count()


@dataclass(frozen=True, eq=False)  # identity semantics: two snapshots are the same only if they are one object
class WeightSnapshot:
    cfg: ModelConfig
    graphdef: Any  # nnx.GraphDef of a Decoder (hashable: a static jit argument)
    frozen: nnx.State  # weights that do not change between snapshots of one model (LoRA: the base)
    trainable: nnx.State  # LoRA adapters, or every Param for full fine-tuning
    name: str = ""
    uid: int = field(default_factory=lambda: next(_ids))

    def model(self) -> Decoder:
        """The Decoder these weights describe (for reference computations and tests)."""
        return nnx.merge(self.graphdef, self.frozen, self.trainable)


def split_decoder(decoder: Decoder) -> tuple[Any, nnx.State, nnx.State]:
    """Decoder -> (graphdef, frozen, trainable).

    LoRA models (any nnx.LoRAParam present): frozen = base Params, trainable = LoRAParams.
    Otherwise (full fine-tuning or a base model): frozen is empty and trainable holds every Param.
    """
    has_lora = bool(jax.tree.leaves(nnx.state(decoder, nnx.LoRAParam)))
    if has_lora:
        return nnx.split(decoder, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)), nnx.LoRAParam)
    graphdef, params = nnx.split(decoder, nnx.Param)
    return graphdef, nnx.State({}), params


def snapshot_of(decoder: Decoder, name: str = "") -> WeightSnapshot:
    """Freeze the decoder's current weights into a snapshot (arrays are immutable; nothing is copied)."""
    graphdef, frozen, trainable = split_decoder(decoder)
    return WeightSnapshot(decoder.cfg, graphdef, frozen, trainable, name)


def make_snapshot(cfg: ModelConfig, graphdef: Any, frozen: nnx.State, trainable: nnx.State,
                  name: str = "") -> WeightSnapshot:
    """A snapshot from a triple the trainer already holds (e.g. after an optimizer step)."""
    return WeightSnapshot(cfg, graphdef, frozen, trainable, name)
