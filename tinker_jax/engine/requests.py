"""The typed payloads of engine requests (engine.scheduler.Request.body), validated before they are queued.

Each is a plain value: numpy arrays, small dataclasses and strings, so a scheduled round can be broadcast to the
processes of a multi-host engine as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from tinker_jax.engine.registry import TinkerPath
from tinker_jax.models.lora import LoraSpec
from tinker_jax.training.batching import RequestRows
from tinker_jax.training.optim import AdamHP, DimuonHP


@dataclass(frozen=True)
class CreateRun:
    """A new run: LoRA (`spec`) or full fine-tuning (`spec` None), optionally loaded from a checkpoint."""

    spec: LoraSpec | None
    user_metadata: dict | None = None
    owner: str | None = None
    from_path: TinkerPath | None = None  # create_model_from_state: configured like, then loaded from, this
    with_optimizer: bool = False
    optimizer: str | None = None  # training.optim.OPTIMIZERS; None: AdamW, or from_path the checkpoint's run's


@dataclass(frozen=True)
class Train:
    """forward (no gradient) or forward_backward of one request's datums."""

    rows: RequestRows
    forward_only: bool


@dataclass(frozen=True)
class OptimStep:
    hp: AdamHP | DimuonHP


@dataclass(frozen=True)
class Save:
    """Write a checkpoint (`with_optimizer`: a training checkpoint; else a sampler checkpoint) and, for sampler
    saves, also return an in-memory snapshot. `path` None: only the snapshot (an ephemeral sampler)."""

    path: TinkerPath | None
    with_optimizer: bool
    ttl_seconds: int | None = None
    user_metadata: dict | None = None
    snapshot: bool = False
    export: bool = False  # an external_weights checkpoint: the run's weights as Hugging Face files (PEFT or merged)
    overwrite: bool = True  # False: refused if the checkpoint exists when the save's turn on its path comes


@dataclass(frozen=True)
class Load:
    path: TinkerPath
    with_optimizer: bool


@dataclass(frozen=True)
class Unload:
    pass


@dataclass(frozen=True)
class ChangeCheckpoint:
    """Delete a checkpoint (`delete`), or rewrite fields of its record (`fields`: public, expires). Requests only on
    several processes, where it must wait for every process to finish what came before it on the path."""

    path: TinkerPath
    delete: bool = False
    only_if_expired: bool = False
    fields: dict | None = None


@dataclass(frozen=True)
class OpenSnapshot:
    """Sampler weights: a checkpoint's from disk, or (path None) the base model's own."""

    path: TinkerPath | None
