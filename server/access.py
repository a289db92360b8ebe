"""Who may touch what. Sessions belong to the API key that created them (its owner tag, `deps.key_tag`); models and
sampling sessions belong to their session; a checkpoint belongs to its training run's owner and is readable by
anyone once published. Something that exists but belongs to another key is reported exactly like something that
does not exist (404 / "unknown ..."), so ids cannot be probed.

Runs that were not created through this server (e.g. by the in-process `tinker_jax.ServiceClient` over the same
data directory) have no owner here and are visible to every key.
"""

from __future__ import annotations

from typing import Any

from server.errors import ApiError
from server.store import ModelRow, SamplingSessionRow, SessionRow, Store
from tinker_jax.engine.registry import TinkerPath


def owned_session(store: Store, session_id: Any, owner: str, *, live: bool = False) -> SessionRow:
    """The caller's session, else 404. `live=True` also refuses a finished (closed or expired) session."""
    if not isinstance(session_id, str):
        raise ValueError(f"session_id: must be a string, got {session_id!r}")
    row = store.get_session(session_id)
    if row is None or row.owner != owner:
        raise ApiError(404, f"unknown session {session_id!r}")
    if live and row.finished is not None:
        raise ApiError(400, f"session {session_id!r} is finished ({row.finish_reason}); create a new ServiceClient")
    return row


def owned_model(store: Store, model_id: Any, owner: str) -> ModelRow:
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id: must be a non-empty string, got {model_id!r}")
    row = store.get_model(model_id)
    if row is None or row.owner != owner:
        raise ApiError(404, f"unknown model_id {model_id!r}")
    return row


def owned_sampler(store: Store, sampling_session_id: Any, owner: str) -> SamplingSessionRow:
    if not isinstance(sampling_session_id, str) or not sampling_session_id:
        raise ValueError(f"sampling_session_id: must be a non-empty string, got {sampling_session_id!r}")
    row = store.get_sampling_session(sampling_session_id)
    session = None if row is None else store.get_session(row.session_id)
    if row is None or session is None or session.owner != owner:
        raise ApiError(404, f"unknown sampling_session_id {sampling_session_id!r}")
    return row


def run_owner(store: Store, run_id: str, owners: dict[str, str] | None = None) -> str | None:
    if owners is not None:
        return owners.get(run_id)
    row = store.get_model(run_id)
    return None if row is None else row.owner


def can_see_run(store: Store, run_id: str, owner: str, owners: dict[str, str] | None = None) -> bool:
    found = run_owner(store, run_id, owners)
    return found is None or found == owner


def readable_checkpoint(engine: Any, store: Store, path: Any, owner: str, field: str = "path") -> TinkerPath:
    """Parse and authorize a tinker path for reading (load, sample, weights_info). ValueError (a user error)
    when malformed, missing, or another key's unpublished checkpoint."""
    p = TinkerPath.parse(path, field)  # validates names: no traversal, no absolute paths, exactly 3 parts
    ckpt = engine.registry.get_checkpoint(p)
    if ckpt is None or not (can_see_run(store, p.run_id, owner) or ckpt.get("public")):
        raise ValueError(f"{field}: checkpoint {path} not found")
    return p


def writable_checkpoint(engine: Any, store: Store, run_id: str, checkpoint_id: str, owner: str,
                        checkpoint_type: str | None = None) -> TinkerPath:
    """A REST checkpoint address (`/training_runs/{run_id}/checkpoints/{kind}/{name}`) the caller owns, else 404.
    A bare name needs `?checkpoint_type=training|sampler` (SkyRL's convention; upstream refuses bare ids)."""
    kind_of_type = {"training": "weights", "sampler": "sampler_weights"}
    if "/" not in checkpoint_id:
        if checkpoint_type not in kind_of_type:
            raise ValueError(f"checkpoint_id: expected 'weights/<name>' or 'sampler_weights/<name>', got "
                             f"{checkpoint_id!r} (or pass checkpoint_type=training|sampler)")
        checkpoint_id = f"{kind_of_type[checkpoint_type]}/{checkpoint_id}"
    p = TinkerPath.parse(f"tinker://{run_id}/{checkpoint_id}", "checkpoint")
    if not can_see_run(store, p.run_id, owner) or engine.registry.get_checkpoint(p) is None:
        raise ApiError(404, f"checkpoint {p} not found")
    return p
