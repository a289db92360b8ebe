"""Helpers shared by the submit routes: the immediate reply, optimizer checks, JSON results."""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable

from server.errors import ApiError
from server.store import Limit, Store
from tinker_jax.engine.api import EngineAPI
from tinker_jax.errors import UserError
from tinker_jax.training.optim import AdamHP, DimuonHP, check_optim_params, optimizer_kind

# Sequence numbers (seq_id, model_seq_id, sampling_session_seq_id, completion cursors) are stored as SQLite INTEGER,
# signed 64-bit, and the store keeps "the next one" (+1) beside some: a larger number would be a 500 from SQLite.
# The SDK counts up from 0 (sample seq_ids of clone c from c * 1e9, so below 1e18).
MAX_SEQ = 2**63 - 2


def untyped_future(request_id: str, **extra: Any) -> dict[str, Any]:
    """What every submit call answers at once (`UntypedAPIFuture`, §3.1): request_id is a string."""
    return {"request_id": request_id, **{k: v for k, v in extra.items() if v is not None}}


def check_optimizer_config(config: Any, field: str = "optimizer_config") -> str:
    """The optimizer a create asks for (SDK 0.30+; absent: AdamW): "adamw" or "dimuon", else a user error."""
    if config is not None and not isinstance(config, dict):
        raise UserError(f"{field}: must be an object, got {type(config).__name__}")
    return optimizer_kind(config, field)


def optim_params(body: dict[str, Any]) -> AdamHP | DimuonHP:
    """optim_step parameters from any of the SDK's aliases (`optim_params`, `adam_params`, `optimizer_params`),
    leniently (§1.4): `{}` and nulls mean the SDK defaults; unknown keys are ignored. Their `type` (absent: Adam)
    picks the family, checked by the engine's one check of it; whether it is the run's optimizer, the engine says."""
    key = next((k for k in ("optim_params", "adam_params", "optimizer_params") if body.get(k) is not None),
               "adam_params")
    raw = body.get(key)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"{key}: must be an object, got {type(raw).__name__}")
    return check_optim_params(raw, key)


def train_key(model_id: str, seq_id: int | None) -> tuple[str, str, int] | None:
    """The idempotency key of a training-side submit: the SDK resends the same (model_id, seq_id) on retry (§1.7)."""
    seq_id = check_seq_id(seq_id)
    return None if seq_id is None else ("train", model_id, seq_id)


def check_seq_id(value: Any, field: str = "seq_id") -> int | None:
    """None, or a sequence number the store can keep (`MAX_SEQ`); UserError naming `field` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise UserError(f"{field}: must be an integer in [0, 2**63 - 2], got {value!r}")
    return value


def check_int64(value: Any, field: str) -> None:
    """Integers that are stored as they are (e.g. lora_config.seed, kept with the run): signed 64-bit."""
    if value is not None and not -(2**63) <= value < 2**63:
        raise UserError(f"{field}: must be a 64-bit integer, got {value!r}")


def check_base_model(engine: EngineAPI, name: str | None, field: str = "base_model") -> None:
    """Only served models: the engine would also load any local directory named by its path, which a remote
    client must not be able to ask for."""
    if name is not None and name not in set(engine.capabilities()):
        raise UserError(f"{field}: unknown model {name!r}; served: {', '.join(map(str, engine.capabilities()))}")


def record_new_model(store: Store, model_id: str, session_id: str, owner: str, limit: Limit) -> None:
    """Record the model a create (or create-via-load) is about to make; LimitReached when the key holds its limit.
    A model already on record is refused (400) before the engine sees the request: the SDK's retries of one create
    share its idempotency key, so this is a create sent again after that key was pruned (`retrieved_ttl_s`), and
    the engine would refuse it too, after which forgetting the record would orphan the live model."""
    if not store.add_model(model_id, session_id, owner, limit):
        raise ApiError(400, f"model_seq_id: model {model_id!r} already exists; create a new model with another "
                            "model_seq_id")


def forget_model_on_failure(store: Store, model_id: str, start: Callable[[], concurrent.futures.Future]
                            ) -> concurrent.futures.Future:
    """Run `start()` (a create or create-via-load of `model_id`, just recorded by `record_new_model`); if it raises
    or its future fails, drop the store's record of the model: it was never made, so it must not count against its
    key."""
    try:
        future = start()
    except BaseException:
        store.remove_model(model_id)
        raise

    def on_done(f: concurrent.futures.Future) -> None:
        if f.cancelled() or f.exception() is not None:
            store.remove_model(model_id)

    future.add_done_callback(on_done)
    return future
