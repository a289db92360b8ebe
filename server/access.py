"""Who may touch what. Every object a request can name has an owner, the tag of an API key (`deps.key_tag`):

- sessions: the key that created them; models and sampling sessions: their session's key (the store);
- futures (request ids): the key that submitted the request (the store's `futures.owner`);
- training runs: the key that created them, which the engine stores with the run (`RunInfo.owner`); a run's
  checkpoints are its owner's, and readable (load, sample, list, weights_info) by every key once published.

Something that exists but belongs to another key is reported exactly like something that does not exist (404 /
"not found", "not cancelled"), so ids cannot be probed.

Fail closed: a run whose owner is unknown (`RunInfo.owner is None`: made by the in-process
`tinker_jax.ServiceClient` over the same data directory, or re-indexed from disk without owner information) is
visible to no key when the server has API keys configured; only an administrator (`tinker-jax admin`) can reach it.
Without API keys (a single-user local server, `ServerSettings.open_access`) such runs are everyone's, as the user
made them. Published checkpoints stay readable either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.errors import ApiError
from server.store import ModelRow, SamplingSessionRow, SessionRow, Store
from tinker_jax.engine.api import EngineAPI, RunInfo
from tinker_jax.engine.registry import KIND_OF_TYPE, TinkerPath
from tinker_jax.errors import NotFound, UserError


@dataclass(frozen=True)
class Caller:
    """Who is asking: the owner tag of their key, and whether ownerless runs are visible (no keys configured)."""

    owner: str
    sees_unowned: bool = False


def owned_session(store: Store, session_id: Any, owner: str, *, live: bool = False) -> SessionRow:
    """The caller's session, else 404. `live=True` also refuses a finished (closed or expired) session."""
    if not isinstance(session_id, str):
        raise UserError(f"session_id: must be a string, got {session_id!r}")
    row = store.get_session(session_id)
    if row is None or row.owner != owner:
        raise ApiError(404, f"session_id: unknown session {session_id!r}")
    if live and row.finished is not None:
        raise ApiError(400, f"session {session_id!r} is finished ({row.finish_reason}); create a new ServiceClient")
    return row


def owned_model(store: Store, model_id: Any, owner: str) -> ModelRow:
    """A model of one of the caller's sessions, else 404. From the store, which records it when create_model is
    submitted, so the requests pipelined right behind a create pass before the engine has made the run."""
    if not isinstance(model_id, str) or not model_id:
        raise UserError(f"model_id: must be a non-empty string, got {model_id!r}")
    row = store.get_model(model_id)
    if row is None or row.owner != owner:
        raise ApiError(404, f"unknown model_id {model_id!r}")
    return row


def owned_sampler(store: Store, sampling_session_id: Any, owner: str) -> SamplingSessionRow:
    if not isinstance(sampling_session_id, str) or not sampling_session_id:
        raise UserError(f"sampling_session_id: must be a non-empty string, got {sampling_session_id!r}")
    row = store.get_sampling_session(sampling_session_id)
    session = None if row is None else store.get_session(row.session_id)
    if row is None or session is None or session.owner != owner:
        raise ApiError(404, f"unknown sampling_session_id {sampling_session_id!r}")
    return row


def sees(run: RunInfo | None, caller: Caller) -> bool:
    """Whether `caller` may see `run` (and its unpublished checkpoints): theirs; one without owner only when the
    server has no API keys. A checkpoint whose run is not on record counts as ownerless."""
    owner = None if run is None else run.owner
    return caller.sees_unowned if owner is None else owner == caller.owner


def can_see_run(engine: EngineAPI, run_id: str, caller: Caller) -> bool:
    return sees(engine.get_run(run_id), caller)


def readable_checkpoint(engine: EngineAPI, path: Any, caller: Caller, field: str = "path") -> TinkerPath:
    """Parse and authorize a tinker path for reading (load, sample, weights_info). NotFound (a user error; 404 over
    HTTP) when missing or another key's unpublished checkpoint; UserError (400) when malformed."""
    p = TinkerPath.parse(path, field)  # validates names: no traversal, no absolute paths, exactly 3 parts
    ckpt = engine.get_checkpoint(str(p))
    if ckpt is None or not (ckpt.public or can_see_run(engine, p.run_id, caller)):
        raise NotFound(f"{field}: checkpoint {path} not found")
    return p


def writable_checkpoint(engine: EngineAPI, run_id: str, checkpoint_id: str, caller: Caller,
                        checkpoint_type: str | None = None) -> str:
    """The tinker path of a REST checkpoint address (`/training_runs/{run_id}/checkpoints/{kind}/{name}`) the caller
    owns, else 404. A bare name needs `?checkpoint_type=training|sampler|external` (SkyRL's convention; upstream
    refuses bare ids)."""
    if "/" not in checkpoint_id:
        if checkpoint_type not in KIND_OF_TYPE:
            raise UserError(f"checkpoint_id: expected 'weights/<name>' or 'sampler_weights/<name>', got "
                            f"{checkpoint_id!r} (or pass checkpoint_type=training|sampler|external)")
        checkpoint_id = f"{KIND_OF_TYPE[checkpoint_type]}/{checkpoint_id}"
    path = str(TinkerPath.parse(f"tinker://{run_id}/{checkpoint_id}", "checkpoint"))
    if not can_see_run(engine, run_id, caller) or engine.get_checkpoint(path) is None:
        raise ApiError(404, f"checkpoint {path} not found")
    return path
