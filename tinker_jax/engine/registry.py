"""SQLite registry of training runs and checkpoints: an index, rebuilt from the checkpoints themselves.

Checkpoint files live under `{data_dir}/checkpoints/{run_id}/{kind}/{name}`, each with its own record
(engine.checkpoints.RECORD: owner, TTL, published, its run's configuration). The disk is the source of truth; this
registry is what lists them fast, finds a run's configuration and owner after a restart, and expires them. At start
the engine checks the database (`PRAGMA quick_check`), sets a corrupt one aside and re-indexes the checkpoint
directories it lacks (engine.index); at shutdown the WAL is merged into the database and the connection closed,
so the file alone is a complete copy.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tinker_jax import dbfile
from tinker_jax.engine.api import CheckpointInfo, RunInfo
from tinker_jax.errors import Stopped, UserError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# The one checkpoint-kind table: the kind in a tinker path -> the SDK's checkpoint_type (and back).
# tinker path kind -> the SDK's checkpoint_type. external_weights: Hugging Face files for download (a PEFT adapter or
# a merged model), never loaded back.
KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
RESTORABLE = ("weights", "sampler_weights")
KIND_OF_TYPE = {v: k for k, v in KINDS.items()}
log = logging.getLogger(__name__)
FILE = "engine.db"  # the registry's file in a data directory


def check_name(value: str, field: str) -> str:
    """Names become path components: letters, digits, . _ : - only; no traversal, no absolute paths."""
    # fullmatch: with match, "$" also matches before a final "\n" ("ckpt\n" would name another directory)
    if not isinstance(value, str) or not NAME_RE.fullmatch(value) or ".." in value:
        raise UserError(f"{field}: invalid name {value!r} (use letters, digits, '.', '_', ':', '-'; "
                         "at most 128 characters, no '/' or '..')")
    return value


def new_run_id() -> str:
    """A fresh training run id (a model id): unique without asking anyone, one path component."""
    return f"run-{uuid.uuid4().hex[:12]}"


MAX_TTL_S = 10 * 365 * 24 * 3600  # the SDK documents "1 hour to 10 years"; shorter TTLs are allowed here


def check_ttl(ttl, field: str = "ttl_seconds") -> int | None:
    """A checkpoint's time to live: None (kept until deleted) or whole seconds in (0, MAX_TTL_S]."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl <= MAX_TTL_S:
        raise UserError(f"{field}: must be a whole number of seconds in (0, {MAX_TTL_S}], got {ttl!r}")
    return ttl


def check_metadata(value, field: str = "user_metadata") -> dict | None:
    """user_metadata: None or a mapping with string keys (the SDK's dict[str, str]; other JSON values are kept)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise UserError(f"{field}: expected a dict of strings, got {type(value).__name__} {str(value)[:80]!r}")
    return dict(value)


@dataclass(frozen=True)
class TinkerPath:
    run_id: str
    kind: str  # KINDS: "weights" | "sampler_weights" | "external_weights"
    name: str

    @staticmethod
    def parse(path: str, field: str = "path") -> "TinkerPath":
        if not isinstance(path, str) or not path.startswith("tinker://"):
            raise UserError(f"{field}: expected 'tinker://<run_id>/<weights|sampler_weights|external_weights>/"
                            f"<name>', got {path!r}")
        parts = path[len("tinker://"):].split("/")
        if len(parts) != 3 or parts[1] not in KINDS:
            raise UserError(f"{field}: expected 'tinker://<run_id>/<weights|sampler_weights|external_weights>/"
                            f"<name>', got {path!r}")
        return TinkerPath(check_name(parts[0], f"{field} run id"), parts[1], check_name(parts[2], f"{field} name"))

    def __str__(self) -> str:
        return f"tinker://{self.run_id}/{self.kind}/{self.name}"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY, base_model TEXT NOT NULL, lora_rank INTEGER, train_attn INTEGER, train_mlp INTEGER,
  train_unembed INTEGER, full_finetune INTEGER NOT NULL DEFAULT 0, seed INTEGER, created REAL NOT NULL,
  last_request REAL, user_metadata TEXT, owner TEXT);
CREATE TABLE IF NOT EXISTS checkpoints (
  run_id TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, created REAL NOT NULL, size_bytes INTEGER,
  public INTEGER NOT NULL DEFAULT 0, expires REAL, step INTEGER, user_metadata TEXT,
  PRIMARY KEY (run_id, kind, name));
"""


class Registry:
    def __init__(self, db_path: str | Path, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.path = Path(db_path)
        self._lock = threading.RLock()  # _q holds it around _exec
        self._db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss, not only a crash
        self._db.executescript(_SCHEMA)

    @staticmethod
    def open(db_path: str | Path, data_dir: str | Path) -> "Registry":
        """Open the registry, first setting aside a database that fails its integrity check (logged; the caller
        re-indexes the checkpoints from disk: engine.index.reindex)."""
        db_path = Path(db_path)
        try:
            dbfile.check(db_path)
        except dbfile.DatabaseCorrupt as e:
            aside = dbfile.set_aside(db_path)
            log.error("the checkpoint registry is corrupt (%s); set it aside as %s and rebuilding it from the "
                      "checkpoint directories", e, aside.name)
        return Registry(db_path, data_dir)

    def close(self) -> None:
        """Merge the WAL into the database file and close (idempotent)."""
        with self._lock:
            if self._db is not None:
                dbfile.close(self._db, self.path.name)
                self._db = None

    def _q(self, sql: str, args=()) -> list:
        """Rows of a query (fetched under the lock: the connection is shared by threads)."""
        with self._lock:
            return self._exec(sql, args).fetchall()

    def _exec(self, sql: str, args=()) -> sqlite3.Cursor:
        with self._lock:
            if self._db is None:
                raise Stopped("the checkpoint registry is closed (engine shut down)")
            return self._db.execute(sql, args)

    def checkpoint_dir(self, p: TinkerPath) -> Path:
        return self.data_dir / "checkpoints" / p.run_id / p.kind / p.name

    # ---- runs
    def add_run(self, run_id: str, base_model: str, *, lora_rank: int | None, full_finetune: bool, meta: dict,
                user_metadata=None, owner=None, created: float | None = None):
        created = created or time.time()
        self._q("INSERT OR REPLACE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, base_model, lora_rank, int(bool(meta.get("train_attn", True))),
                 int(bool(meta.get("train_mlp", True))), int(bool(meta.get("train_unembed", True))),
                 int(full_finetune), meta.get("seed"), created, created, json.dumps(user_metadata or {}),
                 owner))

    def add_run_record(self, run_id: str, run: dict, owner: str | None) -> bool:
        """Insert a run from a checkpoint's record (re-indexing) unless it is known. Returns whether it was added."""
        if self.get_run(run_id) is not None:
            return False
        cur = self._exec(
            "INSERT OR IGNORE INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (run_id, run["base_model"], run.get("lora_rank"), int(bool(run.get("train_attn", True))),
             int(bool(run.get("train_mlp", True))), int(bool(run.get("train_unembed", True))),
             int(bool(run.get("full_finetune", False))), run.get("seed"), run.get("created") or time.time(),
             None, json.dumps(run.get("user_metadata") or {}), owner))
        return cur.rowcount > 0

    def set_run_owner(self, run_id: str, owner: str | None) -> bool:
        """Give a run an owner (`tinker-jax admin chown`); the caller rewrites its checkpoints' records first."""
        return self._exec("UPDATE runs SET owner=? WHERE run_id=?", (owner, run_id)).rowcount > 0

    def touch_runs(self, run_ids) -> None:
        """Record a request for each run (one statement for a whole batch)."""
        now = time.time()
        with self._lock:
            if self._db is not None:
                self._db.executemany("UPDATE runs SET last_request=? WHERE run_id=?",
                                     [(now, r) for r in set(run_ids)])

    def get_run(self, run_id: str) -> RunInfo | None:
        rows = self._q("SELECT * FROM runs WHERE run_id=?", (run_id,))
        return _run(rows[0]) if rows else None

    def list_runs(self) -> list[RunInfo]:
        """Newest first."""
        return [_run(r) for r in self._q("SELECT * FROM runs ORDER BY created DESC")]

    # ---- checkpoints
    def add_checkpoint(self, p: TinkerPath, *, size_bytes: int, step: int, ttl_seconds=None, user_metadata=None,
                       created: float | None = None, expires: float | None = None, public: bool = False):
        if expires is None and ttl_seconds:
            expires = time.time() + ttl_seconds
        self._q("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?,?,?,?,?,?)",
                (p.run_id, p.kind, p.name, created or time.time(), size_bytes, int(bool(public)), expires, step,
                 json.dumps(user_metadata or {})))

    def add_checkpoint_record(self, p: TinkerPath, record: dict) -> None:
        """Index a checkpoint from its own record (engine.checkpoints.RECORD)."""
        self.add_checkpoint(p, size_bytes=record.get("size_bytes"), step=record.get("step"),
                            user_metadata=record.get("user_metadata"), created=record.get("created"),
                            expires=record.get("expires"), public=bool(record.get("public")))

    def checkpoint_paths(self) -> set[TinkerPath]:
        return {TinkerPath(r["run_id"], r["kind"], r["name"])
                for r in self._q("SELECT run_id, kind, name FROM checkpoints")}

    def get_checkpoint(self, p: TinkerPath) -> CheckpointInfo | None:
        rows = self._q("SELECT * FROM checkpoints WHERE run_id=? AND kind=? AND name=?", (p.run_id, p.kind, p.name))
        return _checkpoint(rows[0]) if rows else None

    def list_checkpoints(self, run_id: str | None = None) -> list[CheckpointInfo]:
        """Newest first."""
        if run_id is None:
            rows = self._q("SELECT * FROM checkpoints ORDER BY created DESC")
        else:
            rows = self._q("SELECT * FROM checkpoints WHERE run_id=? ORDER BY created DESC", (run_id,))
        return [_checkpoint(r) for r in rows]

    def delete_checkpoint(self, p: TinkerPath) -> bool:
        return self._exec("DELETE FROM checkpoints WHERE run_id=? AND kind=? AND name=?",
                          (p.run_id, p.kind, p.name)).rowcount > 0

    def set_checkpoint(self, p: TinkerPath, **fields):
        for k, v in fields.items():
            assert k in ("public", "expires")
            self._q(f"UPDATE checkpoints SET {k}=? WHERE run_id=? AND kind=? AND name=?", (v, p.run_id, p.kind, p.name))

    def usage(self, owner: str | None) -> tuple[int, int]:
        """(checkpoints, bytes) recorded for runs of `owner`."""
        rows = self._q("SELECT COUNT(*) AS n, COALESCE(SUM(c.size_bytes), 0) AS b FROM checkpoints c "
                       "JOIN runs r ON r.run_id = c.run_id WHERE r.owner IS ?", (owner,))
        return int(rows[0]["n"]), int(rows[0]["b"])

    def ping(self) -> None:
        self._q("SELECT 1")

    def expired(self, now: float | None = None) -> list[TinkerPath]:
        rows = self._q("SELECT run_id, kind, name FROM checkpoints WHERE expires IS NOT NULL AND expires < ?",
                       (now or time.time(),))
        return [TinkerPath(r["run_id"], r["kind"], r["name"]) for r in rows]


def _json(raw) -> dict:
    try:
        out = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    return out if isinstance(out, dict) else {}


def _run(r: sqlite3.Row) -> RunInfo:
    return RunInfo(run_id=r["run_id"], base_model=r["base_model"],
                   lora_rank=None if r["full_finetune"] else r["lora_rank"], created=r["created"],
                   last_request=r["last_request"], owner=r["owner"], user_metadata=_json(r["user_metadata"]))


def _checkpoint(r: sqlite3.Row) -> CheckpointInfo:
    p = TinkerPath(r["run_id"], r["kind"], r["name"])
    return CheckpointInfo(path=str(p), run_id=p.run_id, kind=p.kind, name=p.name, created=r["created"],
                          size_bytes=r["size_bytes"], public=bool(r["public"]), expires=r["expires"], step=r["step"],
                          user_metadata=_json(r["user_metadata"]))
