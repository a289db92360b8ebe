"""SQLite database files: the integrity check at start, setting a corrupt one aside, and a clean close.

Both databases of a data directory (the engine's registry, engine.db, and the server's state, server.sqlite3) use
WAL. A committed row may live only in the `-wal` file until a checkpoint merges it, so `close` merges it first:
after a clean stop the main file alone is a complete copy (what a backup or a user copying files expects).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

log = logging.getLogger(__name__)

SIDE_FILES = ("-wal", "-shm", "-journal")


class DatabaseCorrupt(RuntimeError):
    """A database file that is not SQLite or fails `PRAGMA quick_check`."""

    def __init__(self, path: Path, detail: str):
        super().__init__(f"{path.name}: {detail}")
        self.path = path
        self.detail = detail


def check(path: str | Path) -> None:
    """DatabaseCorrupt unless `path` (if it exists) is a SQLite database that passes `PRAGMA quick_check`
    (its WAL included). Other errors (permissions, a full disk) propagate as they are: rebuilding fixes nothing."""
    path = Path(path)
    if not path.exists():
        return
    try:
        db = sqlite3.connect(path)  # read-write: SQLite replays (or discards) a WAL left by a killed process
        try:
            result = quick_check(db)
        finally:
            db.close()
    except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
        text = str(e)
        if isinstance(e, sqlite3.OperationalError) and "malformed" not in text and "not a database" not in text:
            raise
        raise DatabaseCorrupt(path, text) from None
    if result != "ok":
        raise DatabaseCorrupt(path, result)


def quick_check(db: sqlite3.Connection) -> str:
    """'ok', or SQLite's first few complaints (`PRAGMA quick_check`; sqlite3.DatabaseError when it cannot run)."""
    problems = [str(r[0]) for r in db.execute("PRAGMA quick_check").fetchall() if r[0] != "ok"]
    return "; ".join(problems[:3]) if problems else "ok"


def set_aside(path: str | Path) -> Path:
    """Rename a database (and its WAL / shared-memory files) to `{name}.corrupt-{time}`, keeping it for
    inspection. Returns the new path of the main file."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", *SIDE_FILES):
        f = path.with_name(path.name + suffix)
        if f.exists():
            f.rename(aside.with_name(aside.name + suffix))
    return aside


def close(db: sqlite3.Connection, what: str) -> None:
    """Merge the WAL into the main file, then close."""
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.DatabaseError as e:
        log.warning("could not merge the WAL of %s at close: %s", what, e)
    db.close()
