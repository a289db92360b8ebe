"""The registry rebuilt from the checkpoints on disk (at every start, and by `tinker-jax admin reindex`).

Each checkpoint directory carries its own record (engine.checkpoints.RECORD), so the registry can lose rows, its
WAL or the whole file and every checkpoint comes back: listed for its owner, with its TTL and published flag, and
its run's configuration. Rows whose directory is gone are dropped. A checkpoint saved before records existed gets
one written from what the registry knows of it (or, when the registry lost it too, from the checkpoint's own
metadata, with no owner: with API keys configured such a checkpoint is visible to no key until an admin gives it
one, `tinker-jax admin chown`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tinker_jax import atomic
from tinker_jax.engine import checkpoints
from tinker_jax.engine.registry import KINDS, Registry, TinkerPath, check_name
from tinker_jax.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    checkpoints: int = 0  # checkpoint directories found
    added: int = 0  # rows the registry lacked
    runs_added: int = 0
    updated: int = 0  # rows whose published flag, TTL or run owner differed from the record
    records_written: int = 0  # checkpoints that had no record yet
    dropped: int = 0  # rows whose directory is gone
    unowned: int = 0  # checkpoints whose run has no known owner
    unreadable: list[str] | None = None  # directories that are not checkpoints (left alone)
    seconds: float = 0.0

    def changed(self) -> bool:
        return bool(self.added or self.runs_added or self.updated or self.records_written or self.dropped)

    def summary(self) -> str:
        return (f"{self.checkpoints} checkpoints on disk: {self.added} re-indexed, {self.runs_added} runs restored, "
                f"{self.updated} updated from their records, {self.records_written} records written, "
                f"{self.dropped} index rows without files dropped, {self.unowned} without an owner, "
                f"{len(self.unreadable or ())} unreadable ({self.seconds:.2f} s)")


def scan(root: Path) -> Iterator[tuple[TinkerPath, Path]]:
    """Every committed checkpoint directory under `root` ({run_id}/{kind}/{name}; temporaries and unfinished deletes,
    whose names start with '.', are skipped; a checkpoint whose overwrite was killed between its two renames is
    read from its moved-aside old copy, as `atomic.resolve` finds it: offline commands that do not sweep first
    (`tinker-jax admin reindex`, `chown`, `check`) would otherwise drop its row)."""
    if not root.is_dir():
        return
    for run_dir in sorted(root.iterdir()):
        if run_dir.name.startswith(".") or not run_dir.is_dir():
            continue
        for kind in KINDS:
            kind_dir = run_dir / kind
            if not kind_dir.is_dir():
                continue
            for name in atomic.entries(kind_dir):
                d = atomic.resolve(kind_dir / name)  # an overwrite killed between its renames: the old copy
                if not d.is_dir():
                    continue
                try:
                    yield TinkerPath(check_name(run_dir.name, "run id"), kind, check_name(name, "name")), d
                except UserError:
                    log.warning("skipping %s/%s/%s: not a checkpoint name", run_dir.name, kind, name)


def record_from_registry(registry: Registry, p: TinkerPath, d: Path) -> dict:
    """A record for a checkpoint saved before records existed: what the registry knows, else its own metadata."""
    meta = checkpoints.read_meta(d)
    info = registry.get_checkpoint(p)
    run = registry.get_run(p.run_id)
    run_fields = {k: v for k, v in meta.items() if k not in ("step", "kind", "with_optimizer", "format_version")}
    record = checkpoints.new_record(
        p, owner=run.owner if run is not None else None,
        created=info.created if info is not None else d.stat().st_mtime,
        public=bool(info.public) if info is not None else False, expires=info.expires if info is not None else None,
        step=meta.get("step"), user_metadata=info.user_metadata if info is not None else {},
        run={**run_fields, "created": run.created if run is not None else None,
             "user_metadata": run.user_metadata if run is not None else {}})
    return {**record, "size_bytes": checkpoints.size_bytes(d), "version": checkpoints.RECORD_VERSION}


def rewrite_record(registry: Registry, p: TinkerPath, d: Path, **fields) -> None:
    """Change `fields` of a checkpoint's record (publish, TTL, owner); a checkpoint saved before records existed
    gets one, made from the registry, first."""
    record = checkpoints.read_record(d) or record_from_registry(registry, p, d)
    checkpoints.write_record(d, {**record, **fields})


def _record(registry: Registry, p: TinkerPath, d: Path, report: IndexReport, write_records: bool) -> dict:
    """`d`'s record; for a checkpoint saved before records existed, one made from the registry (and written)."""
    record = checkpoints.read_record(d)
    if record is None:
        record = record_from_registry(registry, p, d)
        if write_records:
            checkpoints.write_record(d, record)
        report.records_written += 1
    return record


def _row_of(info) -> tuple:
    return (info.created, info.size_bytes, info.public, info.expires, info.step, info.user_metadata or {})


def _row_of_record(record: dict) -> tuple:
    """What the registry's row holds once indexed from `record` (Registry.add_checkpoint_record)."""
    return (record.get("created"), record.get("size_bytes"), bool(record.get("public")), record.get("expires"),
            record.get("step"), record.get("user_metadata") or {})


def reindex(registry: Registry, root: Path, *, write_records: bool = True) -> IndexReport:
    """Make the registry agree with the checkpoint directories under `root`. Only while nothing writes them (at
    start, or offline). `write_records=False` leaves the checkpoint directories untouched (a dry run on a copy of
    the registry: `tinker-jax admin check`)."""
    t0 = time.perf_counter()
    report = IndexReport(unreadable=[])
    on_disk = set()
    owners: dict[str, tuple[float, str]] = {}  # run -> (created, owner) of its newest owned record
    for p, d in scan(root):
        on_disk.add(p)  # even if unreadable below: its row (if any) stays, so it stays listed and deletable
        try:
            record = _record(registry, p, d, report, write_records)
            owner = record.get("owner")
            report.unowned += owner is None
            if owner is not None:
                created = float(record.get("created") or 0.0)
                if p.run_id not in owners or created >= owners[p.run_id][0]:
                    owners[p.run_id] = (created, owner)
            if registry.get_run(p.run_id) is None and isinstance(record.get("run"), dict) and \
                    registry.add_run_record(p.run_id, record["run"], owner):
                report.runs_added += 1
            info = registry.get_checkpoint(p)
            if info is None:
                registry.add_checkpoint_record(p, record)
                report.added += 1
            else:
                # The record is the truth: an overwrite committed its files (and record) but died before its row,
                # or a publish / TTL change before its UPDATE. A stale size and time would keep serving the old
                # version's cached archive and count the old size against the owner's quota.
                record = {**record, "created": record.get("created") or info.created}  # none recorded: the row's
                if _row_of(info) != _row_of_record(record):
                    registry.add_checkpoint_record(p, record)
                    report.updated += 1
            report.checkpoints += 1
        except Exception as e:  # noqa: BLE001 - one bad checkpoint must not stop the start: reported, left alone
            report.unreadable.append(str(p))
            log.warning("%s: not indexed, %s: %s", p, type(e).__name__, e)
    # A run's owner is its newest record's (a run whose records disagree, e.g. after `admin chown` and an older
    # save, takes the latest word), set once per run.
    for run_id, (_, owner) in owners.items():
        run = registry.get_run(run_id)
        if run is not None and run.owner != owner:
            registry.set_run_owner(run_id, owner)
            report.updated += 1
    for p in registry.checkpoint_paths() - on_disk:
        registry.delete_checkpoint(p)
        report.dropped += 1
    report.seconds = time.perf_counter() - t0
    return report
