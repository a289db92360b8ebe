"""The files of checkpoints on record: listing, lookup of one listed file and a tar of them (downloads), and copies
that share them (copy_weights).

Pure functions of a Registry (which knows where each checkpoint lives under its data directory), so that the
engine and stand-ins of it share them. A file is only ever found by its name in a checkpoint's listing: names
from a request are never joined onto a path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import time
import uuid
from pathlib import Path

from tinker_jax import atomic
from tinker_jax.engine import checkpoints
from tinker_jax.engine.checkpoints import is_record_file
from tinker_jax.engine.quota import CheckpointQuota
from tinker_jax.engine.registry import Registry, TinkerPath, check_name
from tinker_jax.errors import NotFound, UserError

ARCHIVE_MAX_IDLE_S = 86400  # archives not downloaded for this long are removed when another one is built


def _dir(registry: Registry, path: str) -> Path:
    p = TinkerPath.parse(path)
    d = atomic.resolve(registry.checkpoint_dir(p))
    if registry.get_checkpoint(p) is None or not d.is_dir():
        raise NotFound(f"path: checkpoint {path} not found")
    return d


def checkpoint_files(registry: Registry, path: str) -> dict[str, int]:
    """A checkpoint's files, relative names -> sizes in bytes (its record excluded). NotFound when it is not on
    record or its directory is gone."""
    d = _dir(registry, path)
    return {f.relative_to(d).as_posix(): f.stat().st_size for f in sorted(d.rglob("*"))
            if f.is_file() and not f.is_symlink() and not is_record_file(f.name)}


def checkpoint_file(registry: Registry, path: str, name: str) -> Path:
    """Where one of `checkpoint_files(path)` is; NotFound for any name the listing does not have."""
    if name not in checkpoint_files(registry, path):
        raise NotFound(f"file {name!r} is not in checkpoint {path}")
    return _dir(registry, path) / name


def link_tree(src: Path, dst: Path) -> None:
    """Fill the empty directory `dst` with `src`'s files (the record excluded) as hard links: the two share their
    bytes, and the filesystem counts the links, so deleting either keeps the other whole. Copies where a link is
    impossible (another filesystem)."""
    for f in sorted(src.rglob("*")):
        if is_record_file(f.name) or not f.is_file() or f.is_symlink():
            continue
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


def copy_checkpoint(registry: Registry, source: str, run_id: str, *, owner: str | None,
                    ttl_seconds: int | None = None, quota: CheckpointQuota | None = None) -> str:
    """SDK copy_weights: the checkpoint `source` under a new run `run_id` (of `owner`; it holds the copy and
    cannot be trained, since no worker knows it), same kind and name, sharing the source's files (hard links:
    deleting either keeps the other loadable). The copy counts toward the owner's checkpoint bytes (as the source
    does toward its owner's), so it is refused when it would take them past `quota` (the engine's ledger of config
    checkpoint_quota_bytes, which counts the owner's saves still queued too; an in-process copy, without owner, is
    never limited). -> the copy's tinker path."""
    src = TinkerPath.parse(source, "source_path")
    check_name(run_id, "run id")
    info = registry.get_checkpoint(src)
    src_dir = atomic.resolve(registry.checkpoint_dir(src))
    if info is None or not src_dir.is_dir():
        raise NotFound(f"source_path: checkpoint {source} not found")
    if registry.get_run(run_id) is not None:
        raise UserError(f"run id: {run_id!r} already exists")
    run = registry.get_run(src.run_id)
    old = checkpoints.read_record(src_dir) or {}
    run_conf = dict(old.get("run") or {})
    if run is not None and "base_model" not in run_conf:  # a source without its record: the copy's must rebuild a run
        run_conf.update(base_model=run.base_model, lora_rank=run.lora_rank, full_finetune=not run.is_lora)
    meta = {k: v for k, v in run_conf.items() if k not in ("created", "user_metadata")}
    now = time.time()
    dst = TinkerPath(run_id, src.kind, src.name)
    # The copy's run is the copier's: the source run's user_metadata stays with it (a registry rebuilt from the
    # records would otherwise show the source owner's metadata on the copier's run).
    run_meta = {"copied_from": source}
    record = checkpoints.new_record(dst, owner=owner, created=now, public=False, step=info.step,
                                    expires=now + ttl_seconds if ttl_seconds else None,
                                    user_metadata=info.user_metadata,
                                    run={**run_conf, "created": now, "user_metadata": run_meta})

    def fill(tmp: Path) -> None:
        link_tree(src_dir, tmp)
        if not any(p.is_file() for p in tmp.rglob("*")):  # the source went away under us: copy nothing
            raise NotFound(f"source_path: checkpoint {source} not found")

    held = 0 if quota is None else quota.reserve(owner, info.size_bytes or 0, what=f"source_path: copying {source}")
    try:
        # Files first (atomic, with their record), then the run and the checkpoint's row: a failure leaves no run
        # that lists nothing (and a crash between, a record the next start's re-index lists).
        record = checkpoints.save_files(registry.checkpoint_dir(dst), fill, record)
        registry.add_run(run_id, run.base_model if run else meta.get("base_model", ""),
                         lora_rank=run.lora_rank if run else meta.get("lora_rank"),
                         full_finetune=bool(meta.get("full_finetune", False)), meta=meta, owner=owner,
                         user_metadata=run_meta, created=now)
        registry.add_checkpoint_record(dst, record)
    finally:  # recorded in the registry (it counts there now), or failed
        if quota is not None:
            quota.release(owner, held)
    return str(dst)


def _archive_dir(registry: Registry, path: str) -> Path:
    return registry.data_dir / "archives" / hashlib.sha256(path.encode()).hexdigest()[:32]


def drop_archives(registry: Registry, path: str) -> None:
    """Remove every tar built of checkpoint `path` (it is being deleted or rewritten)."""
    shutil.rmtree(_archive_dir(registry, path), ignore_errors=True)


def _drop_idle_archives(registry: Registry) -> None:
    """Remove every archive not downloaded for ARCHIVE_MAX_IDLE_S. Other paths' turns run beside this one (another
    path's delete drops its archives, its build replaces its tar), so what the listing names may be gone already."""
    now = time.time()
    try:
        tars = list((registry.data_dir / "archives").glob("*/*.tar"))
    except OSError:  # a directory removed while listed: the next build sweeps again
        return
    for old in tars:
        try:
            if now - old.stat().st_mtime > ARCHIVE_MAX_IDLE_S:
                old.unlink()
        except FileNotFoundError:
            pass


def checkpoint_archive(registry: Registry, path: str) -> Path:
    """A tar of the checkpoint's files, built once per version of the checkpoint (its creation time and size) under
    <data_dir>/archives/<path hash>/ and reused; written beside its final name and renamed, so a reader never sees
    half of one. Deleting the checkpoint removes its archives (`drop_archives`); archives of other versions, and
    any not downloaded for a day, are removed when one is built."""
    files = checkpoint_files(registry, path)
    info = registry.get_checkpoint(TinkerPath.parse(path))
    if info is None:  # deleted meanwhile
        raise NotFound(f"path: checkpoint {path} not found")
    root = _archive_dir(registry, path)
    out = root / f"{hashlib.sha256(f'{info.created}|{info.size_bytes}'.encode()).hexdigest()[:32]}.tar"
    if out.exists():
        os.utime(out)
        return out
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("*.tar"):  # an older version of this checkpoint
        old.unlink(missing_ok=True)
    _drop_idle_archives(registry)
    d = _dir(registry, path)
    tmp = root / f".{out.stem}.{uuid.uuid4().hex}.tmp"
    try:
        with tarfile.open(tmp, "w") as tar:
            for name in files:
                tar.add(d / name, arcname=name, recursive=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
