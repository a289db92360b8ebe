"""One writer per data directory: an exclusive lock (`flock` on `{data_dir}/.lock`) held by the engine that serves
it, and taken by offline tools that rewrite it (`tinker-jax admin reindex | chown`).

Why: the start-up sweep, the re-index and the admin commands assume nothing else writes the checkpoints; a second
engine (an in-process ServiceClient started beside a running server) or a repair run against a live server would
remove another writer's in-progress saves or drop its rows. The lock is released when its holder closes it or its
process dies (the kernel drops flock locks with the process, so a killed server never leaves a stale lock).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".lock"


class DataDirInUse(RuntimeError):
    """Another process (or engine) holds the data directory."""


class DataDirLock:
    def __init__(self, data_dir: str | Path, purpose: str):
        self.path = Path(data_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self._fd)
            self._fd = None
            raise DataDirInUse(f"{self.path.parent} is in use by another tinker_jax engine or tool ({holder}); stop "
                               f"it first (one writer per data directory)") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()}: {purpose}\n".encode())

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown holder"
        except OSError:
            return "unknown holder"

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __del__(self) -> None:  # an engine whose start failed after taking the lock gives it back with its object
        self.release()

    def __enter__(self) -> "DataDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
