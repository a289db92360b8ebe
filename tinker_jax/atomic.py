"""The one atomic-commit helper for directories (checkpoints, HF exports, init-model).

`atomic_dir(out)` yields a temporary directory beside `out`; when the block succeeds it becomes `out` by rename.
Replacing an existing `out` moves it aside first (`.{name}.{id}.old`), renames the new one in, then deletes the
old one; if the process dies between the two renames, `recover(out)` (run before every read or write of `out`)
puts the newest moved-aside copy back. A failure inside the block removes the temporary directory (a SIGKILL can
still leave one: `sweep(parent)` removes those). A commit that several processes write into (each its own
shards) uses `staging(out, token)`, a temporary named alike on every process, and one process's `commit`.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


_ASIDE = re.compile(r"^\.(?P<name>.+)\.(?P<id>[0-9a-f]{8})\.(?P<suffix>new|old|deleted)$")


def _aside(out: Path, suffix: str) -> Path:
    return out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.{suffix}")


def _asides(out: Path, *suffixes: str) -> list[Path]:
    """`out`'s own moved-aside or temporary directories, oldest first. Exact: names may contain dots, so
    `.model.v2.{id}.new` belongs to `model.v2`, never to `model`."""
    if not out.parent.is_dir():
        return []
    found = []
    for p in out.parent.iterdir():
        m = _ASIDE.match(p.name)
        if m and m["name"] == out.name and m["suffix"] in suffixes:
            found.append(p)
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _target(p: Path) -> tuple[Path, str] | None:
    m = _ASIDE.match(p.name)
    return (p.parent / m["name"], m["suffix"]) if m else None


def resolve(out: str | Path) -> Path:
    """Where `out`'s contents are now, without changing anything: `out`, or (an interrupted replacement) the
    newest moved-aside copy. For readers that may run beside a writer; only the writer's side calls `recover`."""
    out = Path(out)
    if out.exists():
        return out
    olds = _asides(out, "old")
    return olds[-1] if olds else out


def entries(parent: str | Path) -> list[str]:
    """The names in `parent` a reader should see, sorted: committed entries, and those whose replacement was
    interrupted between its two renames (present only as a moved-aside old copy, which `resolve` finds and
    `recover` puts back). Temporaries and unfinished deletes are not entries."""
    parent = Path(parent)
    names = set()
    for p in parent.iterdir():
        if not p.name.startswith("."):
            names.add(p.name)
            continue
        t = _target(p)
        if t is not None and t[1] == "old" and not t[0].exists():
            names.add(t[0].name)
    return sorted(names)


def recover(out: str | Path) -> Path:
    """Undo a replacement interrupted between its two renames (old moved aside, new not yet in place)."""
    out = Path(out)
    if not out.exists():
        olds = _asides(out, "old")
        if olds:
            olds[-1].rename(out)
    return out


def remove(out: str | Path) -> None:
    """Delete `out` so that it is gone at once or not at all: renamed aside (`.deleted`, which `recover` never
    brings back and `sweep` finishes) before the files are removed, so a crash or a partial removal never leaves a
    half-deleted `out` that a re-index would list again. Its own leftover temporaries go too."""
    out = Path(out)
    # Moved-aside old copies first (a replacement interrupted between its renames, or one whose removal failed):
    # were `out` renamed first, a crash before they went would let `recover` bring one back as the checkpoint.
    for p in _asides(out, "old"):
        os.rename(p, _aside(out, "deleted"))
    if out.exists():
        os.rename(out, _aside(out, "deleted"))
    for p in _asides(out, "new", "deleted"):
        shutil.rmtree(p, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out` that becomes `out` when the block succeeds.

    overwrite=False refuses (FileExistsError) an `out` that exists and is not empty, before and after the block.
    An empty `out` directory is always replaced.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)

    def check() -> None:
        if not overwrite and out.is_dir() and any(out.iterdir()):
            raise FileExistsError(f"{out}: already exists and is not empty (pass overwrite=True to replace it)")
        if not overwrite and out.exists() and not out.is_dir():
            raise FileExistsError(f"{out}: already exists")

    check()
    tmp = _aside(out, "new")
    tmp.mkdir(mode=0o755)
    try:
        yield tmp
        check()  # someone may have written `out` meanwhile
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def staging(out: str | Path, token: str) -> Path:
    """The temporary directory of `out` named by `token` (8 hex digits) rather than drawn: for a commit that several
    processes write into (each its own shards) before one of them calls `commit`. Not created here."""
    out = Path(out)
    if not re.fullmatch(r"[0-9a-f]{8}", token):
        raise ValueError(f"staging token {token!r}: 8 hex digits")
    return out.with_name(f".{out.name}.{token}.new")


def commit(tmp: str | Path, out: str | Path) -> None:
    """Make a complete `staging` directory `out` (replacing an existing `out` as `atomic_dir` does); on failure the
    staged files are removed."""
    tmp, out = Path(tmp), Path(out)
    try:
        recover(out)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():  # replace only once the new one is complete
        old = _aside(out, "old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)  # the commit failed: put the previous one back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def sweep(parent: str | Path) -> list[Path]:
    """Remove what killed commits left in `parent`: temporary `.*.new` directories (and Orbax's temporaries inside
    them), unfinished deletes (`.*.deleted`), and `.*.old` ones whose target exists again (a recovered or
    completed replacement); a replacement interrupted between its renames is first put back (`recover`). Only safe
    while no commit into `parent` is in progress (at start-up). Returns what was removed."""
    parent = Path(parent)
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for p in list(parent.iterdir()):
        t = _target(p)
        if t is not None and t[1] == "old":
            recover(t[0])
    for p in parent.iterdir():
        if not p.name.startswith("."):
            continue
        if ".orbax-checkpoint-tmp" in p.name:  # Orbax's own temporary directory inside a killed commit
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            continue
        t = _target(p)
        if t is not None and (t[1] in ("new", "deleted") or (t[1] == "old" and t[0].exists())):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
