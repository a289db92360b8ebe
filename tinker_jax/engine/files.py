"""The files of checkpoints on record, for downloads: listing, lookup of one listed file, and a tar of them.

Pure functions of a Registry (which knows where each checkpoint lives under its data directory), so that the
engine and stand-ins of it share them. A file is only ever found by its name in a checkpoint's listing: names
from a request are never joined onto a path.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import time
import uuid
from pathlib import Path

from tinker_jax import atomic
from tinker_jax.engine.checkpoints import RECORD
from tinker_jax.engine.registry import Registry, TinkerPath
from tinker_jax.errors import NotFound

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
            if f.is_file() and not f.is_symlink() and f.name != RECORD}


def checkpoint_file(registry: Registry, path: str, name: str) -> Path:
    """Where one of `checkpoint_files(path)` is; NotFound for any name the listing does not have."""
    if name not in checkpoint_files(registry, path):
        raise NotFound(f"file {name!r} is not in checkpoint {path}")
    return _dir(registry, path) / name


def checkpoint_archive(registry: Registry, path: str) -> Path:
    """A tar of the checkpoint's files, built once per version of the checkpoint (path, creation time, size) under
    <data_dir>/archives and reused; written beside its final name and renamed, so a reader never sees half of one."""
    files = checkpoint_files(registry, path)
    info = registry.get_checkpoint(TinkerPath.parse(path))
    key = hashlib.sha256(f"{path}|{info.created}|{info.size_bytes}".encode()).hexdigest()[:32]
    root = registry.data_dir / "archives"
    out = root / f"{key}.tar"
    if out.exists():
        os.utime(out)
        return out
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("*.tar"):
        if time.time() - old.stat().st_mtime > ARCHIVE_MAX_IDLE_S:
            old.unlink(missing_ok=True)
    d = _dir(registry, path)
    tmp = root / f".{key}.{uuid.uuid4().hex}.tmp"
    try:
        with tarfile.open(tmp, "w") as tar:
            for name in files:
                tar.add(d / name, arcname=name, recursive=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
