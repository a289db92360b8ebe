"""Helpers shared by the submit routes: the immediate reply, optimizer checks, JSON results."""

from __future__ import annotations

import math
from typing import Any

from tinker import types

ADAM_TYPES = ("adam", "adamw")
_ADAM_FIELDS = tuple(types.AdamParams.model_fields)  # learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm


def untyped_future(request_id: str, **extra: Any) -> dict[str, Any]:
    """What every submit call answers at once (`UntypedAPIFuture`, §3.1): request_id is a string."""
    return {"request_id": request_id, **{k: v for k, v in extra.items() if v is not None}}


def check_optimizer_config(config: Any, field: str = "optimizer_config") -> None:
    """Only AdamW is implemented; anything else (e.g. dimuon, SDK 0.30+) is refused as a user error."""
    if config is None:
        return
    kind = config.get("type") if isinstance(config, dict) else getattr(config, "type", None)
    if kind is not None and kind not in ADAM_TYPES:
        raise ValueError(f"{field}.type: optimizer {kind!r} is not supported by this server (only 'adamw')")


def adam_params(body: dict[str, Any]) -> types.AdamParams:
    """optim_step parameters from any of the SDK's aliases (`optim_params`, `adam_params`, `optimizer_params`),
    leniently (§1.4): `{}` and nulls mean the SDK defaults; unknown keys are ignored; a non-Adam optimizer is
    refused."""
    key = next((k for k in ("optim_params", "adam_params", "optimizer_params") if body.get(k) is not None), None)
    raw = body.get(key) if key else {}
    if not isinstance(raw, dict):
        raise ValueError(f"{key}: must be an object, got {type(raw).__name__}")
    check_optimizer_config(raw, key or "adam_params")
    values: dict[str, float] = {}
    for name in _ADAM_FIELDS:
        value = raw.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{key}.{name}: must be a finite number, got {value!r}")
        values[name] = float(value)
    params = types.AdamParams(**values)
    if params.learning_rate < 0 or params.eps < 0 or params.weight_decay < 0 or params.grad_clip_norm < 0:
        raise ValueError(f"{key}: learning_rate, eps, weight_decay and grad_clip_norm must be >= 0")
    if not (0 <= params.beta1 < 1 and 0 <= params.beta2 < 1):
        raise ValueError(f"{key}: beta1 and beta2 must lie in [0, 1)")
    return params


def check_seq_id(value: Any, field: str = "seq_id") -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: must be an integer, got {value!r}")
    return value


def check_base_model(engine: Any, name: str | None, field: str = "base_model") -> None:
    """Only served models: the engine would also load any local directory named by its path, which a remote
    client must not be able to ask for."""
    if name is not None and name not in set(engine.capabilities()):
        raise ValueError(f"{field}: unknown model {name!r}; served: {', '.join(map(str, engine.capabilities()))}")
