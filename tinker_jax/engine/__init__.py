"""The engine: one core behind both front doors (runs, checkpoints, scheduling of device work).

`Engine` (engine.core) implements `EngineAPI` (engine.api), the one contract both front doors use.
"""


def __getattr__(name):
    # Lazy: the engine's submodules (api, pools, checkpoints, registry) import without the whole engine.
    if name == "Engine":
        from tinker_jax.engine.core import Engine

        return Engine
    if name == "EngineAPI":
        from tinker_jax.engine.api import EngineAPI

        return EngineAPI
    raise AttributeError(f"module 'tinker_jax.engine' has no attribute {name!r}")
