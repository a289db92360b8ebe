"""The engine: one core behind both front doors (runs, checkpoints, scheduling of device work)."""

from tinker_jax.engine.core import Engine, NotFound

__all__ = ["Engine", "NotFound"]
