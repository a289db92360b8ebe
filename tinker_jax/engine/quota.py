"""config checkpoint_quota_bytes: one ledger per engine for every writer of an owner's checkpoints.

An owner's checkpoints are written by the worker of each base model they train (saves and exports, queued for the
disk) and by copy_weights; each write is checked against what the owner's checkpoints use on disk (the registry)
plus what every writer has reserved and not yet recorded there. One ledger for all of them: a per-worker count let a
write on one base model's worker, or a copy, miss the writes queued on another.

Fail closed: a write reserves its bytes before it reads the registry's usage, and is recorded there before it lets
go of them, so bytes may be counted twice for a moment (a write finishing between the two reads) but never missed.
"""

from __future__ import annotations

import collections
import threading

from tinker_jax.errors import UserError


class CheckpointQuota:
    """Reservations of checkpoint bytes per owner against `quota` (None: unlimited); `usage(owner)` -> the bytes the
    owner's checkpoints take on disk (the registry's). Runs without an owner (in-process) are never limited."""

    def __init__(self, quota: int | None, usage):
        self.quota, self._usage = quota, usage
        self._lock = threading.Lock()  # guards _writing only; the registry is read outside it
        self._writing: collections.Counter = collections.Counter()  # owner -> bytes reserved, not yet recorded

    def reserve(self, owner: str | None, need: int, replaced: int = 0, *, what: str) -> int:
        """Count `need` bytes for `owner` until `release(owner, <the returned bytes>)`; `replaced`: the bytes of the
        checkpoint the write replaces (freed when it commits). Refused (UserError, led by `what`: the field and the
        write, e.g. "path: saving tinker://...") when the owner's checkpoints on disk, less `replaced`, plus every
        reservation, this one included, would pass the quota. -> the bytes reserved (0 when nothing is limited)."""
        if self.quota is None or owner is None:
            return 0
        with self._lock:
            others = self._writing[owner]
            self._writing[owner] += need
        used = self._usage(owner) - replaced + others  # after reserving: a write recorded meanwhile counts twice
        if used + need > self.quota:
            self.release(owner, need)
            raise UserError(f"{what} needs {need} bytes and this key's checkpoints use {used} of its quota of "
                            f"{self.quota} bytes (config checkpoint_quota_bytes); delete checkpoints (or give them a "
                            "TTL) and try again")
        return need

    def release(self, owner: str | None, need: int) -> None:
        """A reserved write is recorded in the registry, or failed."""
        if need:
            with self._lock:
                self._writing[owner] -= need
                if not self._writing[owner]:
                    del self._writing[owner]

    def reserved(self, owner: str | None) -> int:
        with self._lock:
            return self._writing[owner]
