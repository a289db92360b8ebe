"""What one API key may take, checked before anything is written (the knobs live in `server.settings`).

- Body size (HTTP 413) and read time (408): `server.middleware`.
- Free-form stored fields (tags, user_metadata, names; HTTP 400): `check_size` here, before the store or the engine
  sees them.
- Open sessions and models per key: counted in the store, inside the transaction that would add one
  (`Store.create_session`, `Store.add_model`), which raises `LimitReached`. That is a 429 with Retry-After when some
  of the key's sessions are silent and will expire by themselves (the SDK backs off and retries), else a 400 (the
  client has to finish something first; a retry would only wait).
- Requests unfinished per key: `FutureRegistry` counts them (max_queued_per_key); per session and in the whole
  engine: the engine's own bounds. All three refuse with `Overloaded` (429; the SDK retries the same seq_id). LoRA rank and tokens per
  request: the engine's checks (a failed future naming the field).
"""

from __future__ import annotations

import json
from typing import Any

from tinker_jax.errors import UserError


class LimitReached(Exception):
    """A per-key count is at its limit. `retry_after_s` is set when it frees up by itself (then HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


def json_size(value: Any) -> int:
    return len(json.dumps(value, default=str, ensure_ascii=False).encode())


def check_size(field: str, value: Any, limit: int, knob: str = "max_metadata_bytes") -> None:
    """UserError (400) naming the field and the limit when `value`, as JSON, is larger than `limit` bytes."""
    if value is None:
        return
    size = json_size(value)
    if size > limit:
        raise UserError(f"{field}: {size} bytes (as JSON) exceeds this server's limit of {limit} bytes ({knob})")


def check_metadata(limit: int, **fields: Any) -> None:
    """`check_size` for each keyword (the keyword is the field's wire name)."""
    for field, value in fields.items():
        check_size(field, value, limit)
