"""SQLite state of the REST front door: sessions, futures, idempotency keys, sampling sessions.

One connection shared by the event loop and the engine's completion callbacks, serialised by a lock: every
statement here is a short indexed read or write, so a lock is simpler and no slower than a connection per thread.
WAL keeps readers of other processes (a debugging sqlite3 shell) from blocking us.

Ids (wire doc §1.8): models are `{session_id}:train:{n}` because SDK 0.38 derives that name itself on
create-via-load; samplers follow the docs' `{session_id}:sample:{n}`. Session ids therefore contain no ':' or '/'.
Sequence numbers are stored as SQLite INTEGER (64-bit): sample seq_ids reach ~1e18 (§1.7).

Every request object has an owner tag (`deps.key_tag`): sessions and models directly, futures in their `owner`
column (added to older databases at open; their rows keep NULL and answer nobody), sampling sessions through their
session. At open the file is checked (`PRAGMA quick_check`): a corrupt one raises `CorruptDatabase`, naming the file
and the repair command, instead of serving errors. `close()` checkpoints the WAL into the main file.
"""

from __future__ import annotations

import json
import math
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from server.limits import LimitReached
from tinker_jax import dbfile

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id      TEXT PRIMARY KEY,
    owner           TEXT NOT NULL,          -- tag of the API key that created it (never the key itself)
    created         REAL NOT NULL,
    last_heartbeat  REAL NOT NULL,
    tags            TEXT NOT NULL,          -- JSON list
    user_metadata   TEXT,                   -- JSON object or NULL
    sdk_version     TEXT,
    project_id      TEXT,
    display_name    TEXT,
    next_model_seq  INTEGER NOT NULL DEFAULT 0,
    next_sampler_seq INTEGER NOT NULL DEFAULT 0,
    finished        REAL,                   -- NULL while live
    finish_reason   TEXT,
    finish_detail   TEXT
);
CREATE TABLE IF NOT EXISTS futures (
    request_id      TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,          -- create_model, forward_backward, forward, optim_step, sample, ...
    status          TEXT NOT NULL,          -- pending | done | error | lost
    content_type    TEXT,
    result          BLOB,
    error           TEXT,                   -- JSON {"error": str, "category": "user"|"server"}
    created         REAL NOT NULL,
    finished        REAL,
    retrieved       REAL,                   -- first full fetch
    session_id      TEXT,
    model_id        TEXT,
    sampling_session_id TEXT,
    clone_id        INTEGER,                -- sample seq_id // 1e9: one retrieve_futures poller per clone
    cursor          INTEGER,                -- completion order, for retrieve_futures
    owner           TEXT                    -- tag of the API key that submitted it (NULL: from an older server)
);
CREATE INDEX IF NOT EXISTS futures_by_sampler ON futures (sampling_session_id, clone_id, cursor);
CREATE INDEX IF NOT EXISTS futures_by_finished ON futures (finished);
CREATE TABLE IF NOT EXISTS idempotency (
    kind            TEXT NOT NULL,          -- train | sample | create_model | create_sampler | http
    scope           TEXT NOT NULL,          -- model_id, sampling_session_id, session_id or header value
    seq             INTEGER NOT NULL,
    request_id      TEXT NOT NULL,
    created         REAL NOT NULL,
    PRIMARY KEY (kind, scope, seq)
);
CREATE TABLE IF NOT EXISTS sampling_sessions (
    sampling_session_id TEXT PRIMARY KEY,
    session_id      TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    base_model      TEXT,
    model_path      TEXT,
    model_id        TEXT,                   -- training run whose weights it samples, if any
    created         REAL NOT NULL,
    clone_counter   INTEGER NOT NULL DEFAULT 0,
    UNIQUE (session_id, seq)
);
CREATE TABLE IF NOT EXISTS models (
    model_id        TEXT PRIMARY KEY,       -- {session_id}:train:{n} (= the engine's training run id)
    session_id      TEXT NOT NULL,
    owner           TEXT NOT NULL,          -- the session's owner tag
    created         REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS models_by_session ON models (session_id);
CREATE TABLE IF NOT EXISTS run_metrics (    -- what forward_backward and optim_step reported, for the console's plots
    model_id        TEXT NOT NULL,
    time            REAL NOT NULL,
    kind            TEXT NOT NULL,          -- forward_backward | optim_step
    step            INTEGER NOT NULL,       -- optimizer steps of the model recorded before it
    metrics         TEXT NOT NULL           -- JSON {name: number}
);
CREATE INDEX IF NOT EXISTS run_metrics_by_model ON run_metrics (model_id, time);
CREATE INDEX IF NOT EXISTS sampling_sessions_by_session ON sampling_sessions (session_id);
CREATE TABLE IF NOT EXISTS counters (       -- values that must only grow across restarts
    name            TEXT PRIMARY KEY,       -- cursor: the highest completion cursor given, kept when prune deletes it
    value           INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class SessionRow:
    session_id: str
    owner: str
    created: float
    last_heartbeat: float
    tags: list[str]
    user_metadata: dict[str, Any] | None
    sdk_version: str | None
    project_id: str | None
    display_name: str | None
    finished: float | None
    finish_reason: str | None


@dataclass(frozen=True)
class FutureRow:
    request_id: str
    kind: str
    status: str
    content_type: str | None
    result: bytes | None
    error: dict[str, Any] | None
    created: float
    finished: float | None
    session_id: str | None
    model_id: str | None
    sampling_session_id: str | None
    clone_id: int | None
    cursor: int | None
    result_size: int
    owner: str | None = None


@dataclass(frozen=True)
class ModelRow:
    model_id: str
    session_id: str
    owner: str
    created: float


@dataclass(frozen=True)
class SamplingSessionRow:
    sampling_session_id: str
    session_id: str
    seq: int
    base_model: str | None
    model_path: str | None
    model_id: str | None
    created: float


class CorruptDatabase(dbfile.DatabaseCorrupt):
    """The server database fails its integrity check (or is not a database): the server must not start on it. The
    message is for the operator (the log and the terminal, never a client): it names the file and the repair."""

    def __init__(self, path: Path, detail: str):
        super().__init__(Path(path), detail)
        # RuntimeError's text (dbfile's names the file only): replaced with the whole story.
        self.args = (
            f"{self.path}: the server database is corrupt ({detail}); the server will not start on it. Stop the "
            f"server and run `tinker-jax admin reindex --data-dir {self.path.parent}`: it moves the corrupt file "
            "aside (it holds only short-lived sessions and request results; checkpoints and their owners are kept "
            "with the checkpoints), then start the server again.",)

    @classmethod
    def of(cls, e: dbfile.DatabaseCorrupt) -> CorruptDatabase:
        return e if isinstance(e, cls) else cls(e.path, e.detail)


class Store:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._closed = False
        self._db = _open_checked(self.path)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(SCHEMA)
        if "owner" not in {r[1] for r in self._db.execute("PRAGMA table_info(futures)")}:
            self._db.execute("ALTER TABLE futures ADD COLUMN owner TEXT")  # a database of an older server
        # Only this process writes, so an in-memory counter stays monotonic; across restarts it goes on from the
        # highest cursor ever given (prune keeps it in `counters`), since an SDK poller that outlived the restart
        # holds it and asks only for completions after it.
        row = self._db.execute("SELECT MAX(COALESCE((SELECT MAX(cursor) FROM futures), 0), COALESCE("
                               "(SELECT value FROM counters WHERE name = 'cursor'), 0))").fetchone()
        self._cursor = int(row[0])

    def close(self) -> None:
        """Fold the WAL into the main file and close: a stopped server leaves one self-contained file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # A failed merge only warns: the rows are still in the WAL, which SQLite replays at the next open.
            dbfile.close(self._db, self.path.name)

    def ping(self) -> None:
        """A trivial query over each table (for /healthz): raises sqlite3.Error when the database does not answer."""
        with self._lock:
            for table in ("sessions", "models", "sampling_sessions", "futures", "idempotency"):
                self._db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchall()

    def quick_check(self) -> str:
        """'ok', or SQLite's first complaints (sqlite3.DatabaseError when the check cannot even run)."""
        with self._lock:
            return dbfile.quick_check(self._db)

    def _tx(self):
        """`with self._tx() as db:` one locked transaction."""
        return _Transaction(self._lock, self._db)

    # --- sessions ------------------------------------------------------------------------------------------------

    def create_session(self, *, owner: str, tags: Iterable[str] = (), user_metadata: dict[str, Any] | None = None,
                       sdk_version: str | None = None, project_id: str | None = None,
                       display_name: str | None = None, idempotency_key: str | None = None,
                       limit: Limit | None = None) -> str:
        """A new session id; the same one again when `idempotency_key` (the SDK's X-Idempotency-Key, stable across
        its low-level retries of one call) was seen before, so a retried create does not leak a session.
        With `limit`, LimitReached (nothing written) when the owner already has that many open sessions."""
        session_id = uuid.uuid4().hex[:20]
        now = time.time()
        with self._tx() as db:
            if idempotency_key:
                row = db.execute("SELECT request_id FROM idempotency WHERE kind='http' AND scope=? AND seq=0",
                                 (idempotency_key,)).fetchone()
                if row is not None:
                    return row[0]
            if limit is not None:
                open_heartbeats = [r[0] for r in db.execute(
                    "SELECT last_heartbeat FROM sessions WHERE owner=? AND finished IS NULL", (owner,))]
                limit.check(len(open_heartbeats), open_heartbeats, now)
            if idempotency_key:
                db.execute("INSERT INTO idempotency VALUES ('http', ?, 0, ?, ?)", (idempotency_key, session_id, now))
            db.execute(
                "INSERT INTO sessions (session_id, owner, created, last_heartbeat, tags, user_metadata, sdk_version,"
                " project_id, display_name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (session_id, owner, now, now, json.dumps(list(tags)),
                 None if user_metadata is None else json.dumps(user_metadata), sdk_version, project_id, display_name))
        return session_id

    def get_session(self, session_id: str) -> SessionRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM sessions WHERE session_id=?", (session_id,)).fetchone()
        return None if row is None else _session_row(row)

    def heartbeat(self, session_id: str) -> SessionRow | None:
        """Record a heartbeat on a live session; returns the row (finished ones are returned untouched)."""
        with self._tx() as db:
            db.execute("UPDATE sessions SET last_heartbeat=? WHERE session_id=? AND finished IS NULL",
                       (time.time(), session_id))
        return self.get_session(session_id)

    def finish_session(self, session_id: str, reason: str, detail: str | None) -> SessionRow | None:
        """Mark a session finished. First reason wins (SDK docstring), so a retried or repeated finish is a no-op."""
        with self._tx() as db:
            db.execute("UPDATE sessions SET finished=?, finish_reason=?, finish_detail=? "
                       "WHERE session_id=? AND finished IS NULL", (time.time(), reason, detail, session_id))
        return self.get_session(session_id)

    def stale_sessions(self, older_than_s: float) -> list[str]:
        """Live sessions without a heartbeat for `older_than_s` (the SDK beats every 10 s)."""
        with self._lock:
            rows = self._db.execute("SELECT session_id FROM sessions WHERE finished IS NULL AND last_heartbeat < ?",
                                    (time.time() - older_than_s,)).fetchall()
        return [r[0] for r in rows]

    def list_sessions(self, owner: str, limit: int, offset: int) -> list[str]:
        """The owner's session ids, newest first."""
        return [r.session_id for r in self.sessions_of(owner, limit, offset)]

    def count_open(self, owner: str) -> tuple[int, int]:
        """(open sessions, models in open sessions) of `owner`."""
        with self._lock:
            sessions = self._db.execute("SELECT COUNT(*) FROM sessions WHERE owner=? AND finished IS NULL",
                                        (owner,)).fetchone()[0]
            models = self._db.execute("SELECT COUNT(*) FROM models m JOIN sessions s ON s.session_id = m.session_id "
                                      "WHERE m.owner=? AND s.finished IS NULL", (owner,)).fetchone()[0]
        return int(sessions), int(models)

    def model_id_for(self, session_id: str, model_seq_id: int | None = None) -> str:
        """`{session_id}:train:{n}`. n is the client's model_seq_id when given (0.38 derives the id from it);
        else the session's next free number (reserved here). `add_model` keeps later allocations above it."""
        if model_seq_id is not None:
            return f"{session_id}:train:{int(model_seq_id)}"
        return f"{session_id}:train:{self._reserve(session_id, 'next_model_seq', None)}"

    def sampler_id_for(self, session_id: str, sampling_session_seq_id: int | None = None) -> str:
        return f"{session_id}:sample:{self._reserve(session_id, 'next_sampler_seq', sampling_session_seq_id)}"

    def _reserve(self, session_id: str, column: str, seq: int | None) -> int:
        with self._tx() as db:
            row = db.execute(f"SELECT {column} FROM sessions WHERE session_id=?", (session_id,)).fetchone()
            if row is None:
                raise KeyError(f"unknown session {session_id!r}")
            n = row[0] if seq is None else int(seq)
            db.execute(f"UPDATE sessions SET {column}=MAX({column}, ?) WHERE session_id=?", (n + 1, session_id))
        return n

    # --- models --------------------------------------------------------------------------------------------------

    def add_model(self, model_id: str, session_id: str, owner: str, limit: Limit | None = None) -> bool:
        """Record a training model of a session (at submit time, so ownership checks never race the engine). With
        `limit`, LimitReached (nothing written) when the owner's open sessions already hold that many models.
        Returns whether it was recorded now: False when the model is already on record (nothing checked or
        written; the caller must not treat that row as its own to forget)."""
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM models WHERE model_id=?", (model_id,)).fetchone() is not None:
                return False
            if limit is not None:
                heartbeats = [r[0] for r in db.execute(
                    "SELECT s.last_heartbeat FROM models m JOIN sessions s ON s.session_id = m.session_id "
                    "WHERE m.owner=? AND s.finished IS NULL", (owner,))]
                limit.check(len(heartbeats), heartbeats, now)
            db.execute("INSERT INTO models VALUES (?, ?, ?, ?)", (model_id, session_id, owner, now))
            n = model_id.rsplit(":", 1)[-1]
            if n.isdigit():
                db.execute("UPDATE sessions SET next_model_seq=MAX(next_model_seq, ?) WHERE session_id=?",
                           (int(n) + 1, session_id))
        return True

    def remove_model(self, model_id: str) -> None:
        """Forget a model whose creation failed (so it neither counts against its key nor answers requests)."""
        with self._tx() as db:
            db.execute("DELETE FROM models WHERE model_id=?", (model_id,))

    def get_model(self, model_id: str) -> ModelRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM models WHERE model_id=?", (model_id,)).fetchone()
        return None if row is None else ModelRow(row["model_id"], row["session_id"], row["owner"], row["created"])

    def add_metrics(self, model_id: str, kind: str, metrics: dict[str, float]) -> None:
        """Record one training call's metrics (finite numbers only) at the model's current step: the step its
        optimizer state was last loaded at (`mark_step`; 0 for a new model) plus the optim_step calls recorded for
        it since."""
        clean = {str(k): float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        with self._tx() as db:
            mark = db.execute("SELECT step, rowid FROM run_metrics WHERE model_id=? AND kind='start' "
                              "ORDER BY rowid DESC LIMIT 1", (model_id,)).fetchone()
            base, since = (mark["step"], mark["rowid"]) if mark is not None else (0, 0)
            step = base + db.execute("SELECT COUNT(*) FROM run_metrics WHERE model_id=? AND kind='optim_step' "
                                     "AND rowid>?", (model_id, since)).fetchone()[0]
            db.execute("INSERT INTO run_metrics (model_id, time, kind, step, metrics) VALUES (?, ?, ?, ?, ?)",
                       (model_id, time.time(), kind, step, json.dumps(clean)))

    def mark_step(self, model_id: str, step: int) -> None:
        """The model's optimizer state was loaded at `step` (a resume): its later calls count on from there."""
        with self._tx() as db:
            db.execute("INSERT INTO run_metrics (model_id, time, kind, step, metrics) VALUES (?, ?, 'start', ?, "
                       "'{}')", (model_id, time.time(), int(step)))

    def metrics_of(self, model_id: str) -> list[tuple[str, int, float, dict]]:
        """(kind, step, time, metrics) of every recorded call of the model, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT kind, step, time, metrics FROM run_metrics WHERE model_id=? "
                                    "ORDER BY time, rowid", (model_id,)).fetchall()
        return [(r["kind"], r["step"], r["time"], json.loads(r["metrics"])) for r in rows]

    def requests_of(self, owner: str, since: float = 0.0, until: float | None = None, limit: int = 1000
                    ) -> list[dict[str, Any]]:
        """The owner's requests still on record (futures are pruned after future_ttl_s), newest first: when, what
        (kind, model, session) and how it ended."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, status, created, finished, session_id, model_id, sampling_session_id FROM futures "
                "WHERE owner=? AND created>=? AND created<? ORDER BY created DESC LIMIT ?",
                (owner, since, until if until is not None else float("inf"), limit)).fetchall()
        return [dict(r) for r in rows]

    def requests_of_session(self, session_id: str) -> list[dict[str, Any]]:
        """The session's requests still on record (its own, its models' and its samplers'), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, status, created, finished, model_id, sampling_session_id FROM futures "
                "WHERE session_id=? OR model_id IN (SELECT model_id FROM models WHERE session_id=?) "
                "OR sampling_session_id IN (SELECT sampling_session_id FROM sampling_sessions WHERE session_id=?) "
                "ORDER BY created", (session_id, session_id, session_id)).fetchall()
        return [dict(r) for r in rows]

    def set_session_project(self, session_id: str, project_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE sessions SET project_id=? WHERE session_id=?", (project_id, session_id))

    def project_of_model(self, model_id: str) -> str | None:
        """The project of the session that made the model (None: none, or a model this server did not make)."""
        with self._lock:
            row = self._db.execute("SELECT s.project_id FROM models m JOIN sessions s ON s.session_id = m.session_id "
                                   "WHERE m.model_id=?", (model_id,)).fetchone()
        return None if row is None else row[0]

    def sessions_of(self, owner: str, limit: int = 100, offset: int = 0) -> list[SessionRow]:
        """Sessions of `owner`, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM sessions WHERE owner=? ORDER BY created DESC, rowid DESC"
                                    " LIMIT ? OFFSET ?", (owner, limit, offset)).fetchall()
        return [_session_row(r) for r in rows]

    def models_of_session(self, session_id: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT model_id FROM models WHERE session_id=? ORDER BY created",
                                    (session_id,)).fetchall()
        return [r[0] for r in rows]

    # --- sampling sessions ---------------------------------------------------------------------------------------

    def create_sampling_session(self, session_id: str, seq: int | None, *, base_model: str | None,
                                model_path: str | None = None, model_id: str | None = None) -> SamplingSessionRow:
        """Idempotent on (session_id, sampling_session_seq_id) (§1.7): a retry gets the same sampler back."""
        sampler_id = self.sampler_id_for(session_id, seq)
        n = int(sampler_id.rsplit(":", 1)[1])
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO sampling_sessions (sampling_session_id, session_id, seq, base_model,"
                       " model_path, model_id, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (sampler_id, session_id, n, base_model, model_path, model_id, time.time()))
        row = self.get_sampling_session(sampler_id)
        assert row is not None
        return row

    def get_sampling_session(self, sampling_session_id: str) -> SamplingSessionRow | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM sampling_sessions WHERE sampling_session_id=?",
                                   (sampling_session_id,)).fetchone()
        if row is None:
            return None
        return SamplingSessionRow(row["sampling_session_id"], row["session_id"], row["seq"], row["base_model"],
                                  row["model_path"], row["model_id"], row["created"])

    def samplers_of_session(self, session_id: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT sampling_session_id FROM sampling_sessions WHERE session_id=? "
                                    "ORDER BY seq", (session_id,)).fetchall()
        return [r[0] for r in rows]

    def join_sampling_session(self, sampling_session_id: str) -> int:
        """Next clone id (>= 1; the original client is 0) for an unpickled SamplingClient (§2.6)."""
        with self._tx() as db:
            cur = db.execute("UPDATE sampling_sessions SET clone_counter = clone_counter + 1 "
                             "WHERE sampling_session_id=? RETURNING clone_counter", (sampling_session_id,))
            row = cur.fetchone()
        if row is None:
            raise KeyError(f"unknown sampling session {sampling_session_id!r}")
        return int(row[0])

    # --- futures -------------------------------------------------------------------------------------------------

    def insert_future(self, request_id: str, kind: str, *, owner: str,
                      idempotency: tuple[str, str, int] | None = None,
                      session_id: str | None = None, model_id: str | None = None,
                      sampling_session_id: str | None = None, clone_id: int | None = None) -> tuple[str, bool]:
        """Create a pending future. With `idempotency=(kind, scope, seq)` (e.g. ("train", model_id, seq_id)) a
        repeat of the key returns (the first request_id, False) and creates nothing: retried submits resend the
        same seq_id (§1.7), and running a duplicated optim_step twice would take two steps."""
        now = time.time()
        with self._tx() as db:
            if idempotency is not None:
                ikind, scope, seq = idempotency
                db.execute("INSERT OR IGNORE INTO idempotency VALUES (?, ?, ?, ?, ?)",
                           (ikind, scope, int(seq), request_id, now))
                winner = db.execute("SELECT request_id FROM idempotency WHERE kind=? AND scope=? AND seq=?",
                                    (ikind, scope, int(seq))).fetchone()[0]
                if winner != request_id:
                    return winner, False
            db.execute("INSERT INTO futures (request_id, kind, status, created, session_id, model_id,"
                       " sampling_session_id, clone_id, owner) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                       (request_id, kind, now, session_id, model_id, sampling_session_id, clone_id, owner))
        return request_id, True

    def discard_future(self, request_id: str) -> None:
        """Forget a future that never started (the engine refused it, Overloaded) with its idempotency key, so the
        client's retry of the same seq_id is a new request rather than a replay of the refusal."""
        with self._tx() as db:
            if db.execute("DELETE FROM futures WHERE request_id=? AND status='pending'", (request_id,)).rowcount:
                db.execute("DELETE FROM idempotency WHERE request_id=?", (request_id,))

    def finish_future(self, request_id: str, content_type: str, body: bytes) -> int:
        return self._complete(request_id, "status='done', content_type=?, result=?", (content_type, body))

    def fail_future(self, request_id: str, message: str, category: str) -> int:
        error = json.dumps({"error": message, "category": category})
        return self._complete(request_id, "status='error', error=?", (error,))

    def _complete(self, request_id: str, assignments: str, values: tuple) -> int:
        """Finish a pending future once (a late second completion is ignored); returns its completion cursor."""
        with self._tx() as db:
            self._cursor += 1
            cur = db.execute(f"UPDATE futures SET {assignments}, finished=?, cursor=? "
                             "WHERE request_id=? AND status='pending'",
                             (*values, time.time(), self._cursor, request_id))
            if cur.rowcount == 0:
                self._cursor -= 1
                return 0
        return self._cursor

    def get_future(self, request_id: str, *, with_result: bool = True) -> FutureRow | None:
        cols = "*" if with_result else _FUTURE_COLS_NO_RESULT
        with self._lock:
            row = self._db.execute(f"SELECT {cols}, LENGTH(result) AS result_size FROM futures WHERE request_id=?",
                                   (request_id,)).fetchone()
        return None if row is None else _future_row(row)

    def completions(self, sampling_session_id: str, clone_id: int, after_cursor: int, limit: int = 1000
                    ) -> list[FutureRow]:
        """Finished or failed futures of one sampler clone, completed after `after_cursor`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_FUTURE_COLS_NO_RESULT}, LENGTH(result) AS result_size FROM futures "
                "WHERE sampling_session_id=? AND clone_id=? AND cursor > ? ORDER BY cursor LIMIT ?",
                (sampling_session_id, clone_id, after_cursor, limit)).fetchall()
        return [_future_row(r) for r in rows]

    def mark_retrieved(self, request_ids: Iterable[str], owner: str) -> None:
        """Note the first full fetch (it shortens the future's time to live), of the owner's futures only."""
        with self._tx() as db:
            db.executemany("UPDATE futures SET retrieved=COALESCE(retrieved, ?) WHERE request_id=? AND owner=?",
                           [(time.time(), rid, owner) for rid in request_ids])

    def mark_lost(self) -> int:
        """At startup: futures still pending belonged to an engine that is gone. Returns how many."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT request_id FROM futures WHERE status='pending'").fetchall()]
        for rid in ids:
            self.lose_future(rid)
        return len(ids)

    def lose_future(self, request_id: str) -> int:
        """A pending future whose engine stopped before it finished (a restart, or the engine's shutdown failing
        it): lost, which a sample's poll answers with 410 (the SDK resubmits). Returns its completion cursor."""
        return self._complete(request_id, "status='lost', error=?",
                              (json.dumps({"error": "the server restarted before this request finished",
                                           "category": "server"}),))

    def prune(self, future_ttl_s: float, retrieved_ttl_s: float) -> int:
        """Delete finished futures (and their idempotency keys) past their time to live, and create_session's
        idempotency keys as old. Returns how many futures."""
        now = time.time()
        with self._tx() as db:
            cond = "(finished < ? OR retrieved < ?)"
            args = (now - future_ttl_s, now - retrieved_ttl_s)
            db.execute(f"DELETE FROM idempotency WHERE request_id IN (SELECT request_id FROM futures WHERE {cond})",
                       args)
            # create_session's X-Idempotency-Key rows (no future of their own): kept as long as a finished future
            db.execute("DELETE FROM idempotency WHERE kind = 'http' AND created < ?", (now - future_ttl_s,))
            db.execute("INSERT INTO counters (name, value) VALUES ('cursor', ?) ON CONFLICT (name) DO UPDATE SET "
                       "value = MAX(value, excluded.value)", (self._cursor,))  # what the deleted rows may have held
            return db.execute(f"DELETE FROM futures WHERE {cond}", args).rowcount


_FUTURE_COLS_NO_RESULT = ("request_id, kind, status, content_type, NULL AS result_blob, error, created, finished,"
                          " session_id, model_id, sampling_session_id, clone_id, cursor, owner")


def _future_row(row: sqlite3.Row) -> FutureRow:
    keys = row.keys()
    return FutureRow(
        request_id=row["request_id"], kind=row["kind"], status=row["status"], content_type=row["content_type"],
        result=row["result"] if "result" in keys else None,
        error=json.loads(row["error"]) if row["error"] else None,
        created=row["created"], finished=row["finished"], session_id=row["session_id"], model_id=row["model_id"],
        sampling_session_id=row["sampling_session_id"], clone_id=row["clone_id"], cursor=row["cursor"],
        result_size=row["result_size"] or 0, owner=row["owner"],
    )


def _session_row(row: sqlite3.Row) -> SessionRow:
    return SessionRow(
        session_id=row["session_id"], owner=row["owner"], created=row["created"],
        last_heartbeat=row["last_heartbeat"], tags=json.loads(row["tags"]),
        user_metadata=json.loads(row["user_metadata"]) if row["user_metadata"] else None,
        sdk_version=row["sdk_version"], project_id=row["project_id"], display_name=row["display_name"],
        finished=row["finished"], finish_reason=row["finish_reason"],
    )


@dataclass(frozen=True)
class Limit:
    """A per-owner count limit, checked inside the transaction that would add one. Objects of sessions that have
    stopped heartbeating free up by themselves when those sessions expire (`expire_after_s` without a beat); when
    some do, the refusal says when (HTTP 429), else it is final (400)."""

    what: str  # "open sessions", "models"
    limit: int
    knob: str  # the settings field
    expire_after_s: float
    silent_after_s: float = 30.0  # the SDK beats every 10 s: three missed beats means the client is gone

    def check(self, count: int, heartbeats: list[float], now: float) -> None:
        if count < self.limit:
            return
        silent = [hb for hb in heartbeats if hb < now - self.silent_after_s]
        message = (f"this API key already has {count} {self.what}, the limit ({self.knob}={self.limit}); finish "
                   "sessions you no longer use (ServiceClient.close, or leave a with-block)")
        if silent:
            wait = min(silent) + self.expire_after_s - now
            raise LimitReached(f"{message}; {len(silent)} of its sessions stopped heartbeating and expire within "
                               f"{max(wait, 0):.0f} s", retry_after_s=max(wait, 1.0))
        raise LimitReached(message)


def check_file(path: Path | str) -> None:
    """CorruptDatabase (naming the file and the repair command) unless the server database at `path` is missing
    (a fresh start) or passes `PRAGMA quick_check`. `tinker-jax serve` calls it before starting anything."""
    try:
        dbfile.check(path)
    except dbfile.DatabaseCorrupt as e:
        raise CorruptDatabase.of(e) from None


def _open_checked(path: Path) -> sqlite3.Connection:
    """Check the file (`check_file`), then connect and switch to WAL. A page that breaks between the check and the
    first statements below still gives CorruptDatabase, not a bare sqlite3 error."""
    check_file(path)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as e:
        db.close()
        raise CorruptDatabase(path, str(e)) from None
    return db


class _Transaction:
    def __init__(self, lock: threading.RLock, db: sqlite3.Connection):
        self._lock, self._db = lock, db

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")  # "database is locked" past busy_timeout, a disk error, ...
        except BaseException:
            self._lock.release()  # __exit__ does not run when __enter__ raises: without this, every store call hangs
            raise
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()
