"""`tinker-jax admin`: check, repair, back up and re-own what a data directory holds.

    tinker-jax admin check   [--data-dir DIR | --config YAML]
    tinker-jax admin reindex [--data-dir DIR | --config YAML] [--rebuild]
    tinker-jax admin backup  --out DIR [--data-dir DIR | --config YAML]
    tinker-jax admin chown   RUN_ID (--api-key KEY | --owner TAG) [--data-dir DIR | --config YAML]

A data directory holds the checkpoints (`checkpoints/{run}/{kind}/{name}`, each with its own record: owner, TTL,
published flag, its run's configuration), the engine's registry (`engine.db`, an index of those records, rebuilt
from them at every start) and the server's state (`server.sqlite3`: sessions, models and request results, all
short-lived). So losing either database loses no checkpoint and no owner; a corrupt one is set aside (kept as
`{name}.corrupt-{time}` for inspection), never silently served.

- `check` reads only: the integrity of both databases, and what a re-index would change (on a copy). Exit code 0
  when all is well, 1 when something needs `reindex`.
- `reindex` repairs: sets aside a corrupt database (`--rebuild`: the registry even when it is sound), then brings
  the registry in line with the checkpoints on disk. Stop the server first: it must not write meanwhile.
- `backup` copies both databases consistently (SQLite's online backup; the server may be running). The checkpoints
  themselves are plain directories: copy `checkpoints/` with any file tool (rsync, a snapshot); they are the truth.
- `chown` gives a run (and its checkpoints) an owner: for runs made in-process over the same data directory, or
  checkpoints whose owner was never recorded, which a server with API keys shows to no key.

It imports the server (for the key tag) but nothing imports it; the engine has no idea it exists.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import sys
import tempfile
from pathlib import Path

from tinker_jax.cli import Subcommand

SERVER_DB = "server.sqlite3"  # server.settings.ServerSettings.db_path's name (checked in tests)


def data_dir_of(args: argparse.Namespace) -> Path:
    from tinker_jax.config import EngineConfig

    if args.data_dir is not None:
        return Path(os.path.expanduser(args.data_dir))
    return Path(EngineConfig.load(args.config).data_dir)


def _db_problems(path: Path) -> str | None:
    from tinker_jax import dbfile

    try:
        dbfile.check(path)
    except dbfile.DatabaseCorrupt as e:
        return e.detail
    return None


def _registry_copy(src: Path, data_dir: Path, tmp: Path):
    """The registry, copied (SQLite backup) into `tmp`, so a dry-run re-index changes nothing real."""
    from tinker_jax.engine.registry import Registry

    copy = tmp / "engine.db"
    if src.exists():
        backup_db(src, copy)
    return Registry(copy, data_dir)


def backup_db(src: Path, dst: Path) -> None:
    """A consistent copy of a live SQLite database (its WAL included), written to `dst` and merged to one file."""
    s, d = sqlite3.connect(f"file:{src}?mode=ro", uri=True), sqlite3.connect(dst)
    try:
        s.backup(d)
    finally:
        s.close()
        d.close()


def check(data_dir: Path, out=None) -> int:
    from tinker_jax.engine import index
    from tinker_jax.engine.registry import FILE

    bad = 0
    for name in (FILE, SERVER_DB):
        path = data_dir / name
        problem = None if not path.exists() else _db_problems(path)
        state = "absent (made at start)" if not path.exists() else "ok" if problem is None else f"CORRUPT: {problem}"
        print(f"{name}: {state}", file=out)
        bad += problem is not None
    with tempfile.TemporaryDirectory() as tmp:
        registry_path = data_dir / FILE
        src = registry_path if registry_path.exists() and _db_problems(registry_path) is None else None
        registry = _registry_copy(src or Path(tmp) / "absent.db", data_dir, Path(tmp))
        try:
            report = index.reindex(registry, data_dir / "checkpoints", write_records=False)
        finally:
            registry.close()
    print(f"checkpoints: {report.summary()}", file=out)
    for p in report.unreadable or ():
        print(f"  unreadable: {p}", file=out)
    if report.unowned:
        print(f"  {report.unowned} checkpoints have no owner: `tinker-jax admin chown RUN_ID --api-key KEY`", file=out)
    if bad:
        print("needs `tinker-jax admin reindex` (with the server stopped)", file=out)
    elif report.changed():
        print("the index lags the disk: the engine re-indexes at its next start (or run `tinker-jax admin reindex` "
              "with the server stopped)", file=out)
    else:
        print("all consistent", file=out)
    return 1 if bad or report.changed() else 0


def reindex(data_dir: Path, rebuild: bool = False, out=None) -> int:
    with _offline(data_dir, "admin reindex", out) as ok:
        return _reindex(data_dir, rebuild, out) if ok else 1


def _reindex(data_dir: Path, rebuild: bool, out) -> int:
    from tinker_jax import dbfile
    from tinker_jax.engine import index
    from tinker_jax.engine.registry import FILE, Registry

    for name in (FILE, SERVER_DB):
        path = data_dir / name
        problem = None if not path.exists() else _db_problems(path)
        if problem is not None or (rebuild and name == FILE and path.exists()):
            aside = dbfile.set_aside(path)
            why = f"corrupt ({problem})" if problem is not None else "--rebuild"
            print(f"{name}: {why}; moved aside to {aside.name}", file=out)
    registry = Registry.open(data_dir / FILE, data_dir)
    try:
        report = index.reindex(registry, data_dir / "checkpoints")
    finally:
        registry.close()
    print(f"checkpoints: {report.summary()}", file=out)
    return 0


def backup(data_dir: Path, dest: Path, out=None) -> int:
    from tinker_jax.engine.registry import FILE

    dest.mkdir(parents=True, exist_ok=True)
    for name in (FILE, SERVER_DB):
        src = data_dir / name
        if not src.exists():
            print(f"{name}: absent, skipped", file=out)
            continue
        backup_db(src, dest / name)
        print(f"{name}: copied to {dest / name}", file=out)
    print(f"copy {data_dir / 'checkpoints'} too (any file tool): the checkpoints are the truth, and these databases "
          "are rebuilt from them", file=out)
    return 0


@contextlib.contextmanager
def _offline(data_dir: Path, purpose: str, out):
    """The data directory's lock for a command that rewrites it; yields False (after saying why) when a server or
    another engine holds it: a repair must not race a live writer."""
    from tinker_jax.datadir import DataDirInUse, DataDirLock

    try:
        lock = DataDirLock(data_dir, purpose)
    except DataDirInUse as e:
        print(f"refused: {e}", file=out)
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def chown(data_dir: Path, run_id: str, owner: str, out=None) -> int:
    with _offline(data_dir, "admin chown", out) as ok:
        return _chown(data_dir, run_id, owner, out) if ok else 1


def _chown(data_dir: Path, run_id: str, owner: str, out) -> int:
    from tinker_jax.atomic import recover
    from tinker_jax.engine import index
    from tinker_jax.engine.registry import FILE, Registry, TinkerPath

    registry = Registry.open(data_dir / FILE, data_dir)
    try:
        index.reindex(registry, data_dir / "checkpoints")  # every checkpoint of the run is listed and has a record
        if registry.get_run(run_id) is None:
            print(f"run {run_id!r}: not found in {data_dir}", file=out)
            return 1
        n = 0
        for info in registry.list_checkpoints(run_id):
            p = TinkerPath.parse(info.path)
            d = recover(registry.checkpoint_dir(p))
            index.rewrite_record(registry, p, d, owner=owner)  # the record first: it is the truth
            n += 1
        registry.set_run_owner(run_id, owner)
    finally:
        registry.close()
    print(f"run {run_id}: owner set to {owner}, {n} checkpoint records updated", file=out)
    return 0


# ---- the `tinker-jax admin` subcommand (registered in pyproject.toml under tinker_jax.commands) -----------------

def _add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        where = sp.add_mutually_exclusive_group()
        where.add_argument("--data-dir", metavar="DIR", help="the data directory (default: the config's, else "
                                                             "$TINKER_JAX_DATA_DIR or ~/.local/share/tinker_jax)")
        where.add_argument("--config", metavar="YAML", help="engine config naming the data directory")
        return sp

    common(sub.add_parser("check", help="integrity of both databases and of the checkpoint index (reads only)"))
    r = common(sub.add_parser("reindex", help="set aside corrupt databases and rebuild the checkpoint index from "
                                              "disk (stop the server first)"))
    r.add_argument("--rebuild", action="store_true", help="rebuild the index even when its database is sound")
    b = common(sub.add_parser("backup", help="consistent copies of both databases (the server may be running)"))
    b.add_argument("--out", required=True, metavar="DIR", help="directory to write the copies into")
    c = common(sub.add_parser("chown", help="give a run and its checkpoints an owner (stop the server first)"))
    c.add_argument("run_id", metavar="RUN_ID")
    who = c.add_mutually_exclusive_group(required=True)
    who.add_argument("--api-key", metavar="KEY", help="the API key that will own it (stored as its tag only)")
    who.add_argument("--owner", metavar="TAG", help="an owner tag as stored (e.g. copied from another run)")


def _run(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    if not data_dir.is_dir():
        print(f"--data-dir: {data_dir} is not a directory", file=sys.stderr)
        return 2
    if args.action == "check":
        return check(data_dir)
    if args.action == "reindex":
        return reindex(data_dir, args.rebuild)
    if args.action == "backup":
        return backup(data_dir, Path(args.out))
    if args.action == "chown":
        if args.api_key is not None:
            from server.deps import key_tag

            owner = key_tag(args.api_key)
        else:
            owner = args.owner
        return chown(data_dir, args.run_id, owner)
    raise AssertionError(args.action)


COMMAND = Subcommand("check, repair (re-index), back up and re-own a data directory's databases and checkpoints",
                     _add_arguments, _run)
