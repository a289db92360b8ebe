"""Run the test suite as a few pytest processes in turn (what `make test`, and so CI, runs).

Why several processes: one pytest process for the whole suite accumulates every test's compiled XLA programs, models
and threads for 15 minutes, and two CI runs of that process died with SIGABRT in native code late in the run (once
in the interpreter's teardown after every test had passed, once inside an XLA compile), with the native message lost
to pytest's output capture. Smaller processes hold less, and `--capture=sys` leaves native stderr (XLA's own
messages, an abort's reason) in the log.

Groups: the test files in name order, cut into GROUPS consecutive chunks. Every group runs even when an earlier one
fails; the exit status is the first failing group's (pytest's codes), or 1 when no group collected a test.

One XLA compilation cache for every group (JAX's persistent cache in a temporary directory, every program cached
whatever its compile time): most of the suite's time is compiling tiny models' programs, and groups compile many of
the same ones (a warm cache ran group 4 in 57 s instead of 168 s). Tests that start processes of their own with
jax.distributed leave it out of those processes' environment.

Usage: python scripts/run_tests.py [pytest args...]   (e.g. -m "not gpu_prep", -k moe)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GROUPS = 4
NO_TESTS = 5  # pytest: nothing collected


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    files = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py"))
    size = -(-len(files) // GROUPS)
    groups = [files[i:i + size] for i in range(0, len(files), size)]
    status, collected, t0 = 0, False, time.monotonic()
    env = dict(os.environ)
    cache = None
    if "JAX_COMPILATION_CACHE_DIR" not in env:  # a cache the caller chose is kept as it is
        cache = tempfile.mkdtemp(prefix="tinker-jax-tests-xla-")
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    try:
        status, collected = _run(root, groups, argv, env)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"== {len(groups)} groups in {time.monotonic() - t0:.0f} s: "
          f"{'passed' if status == 0 and collected else 'FAILED' if status else 'no tests collected'}", flush=True)
    return status if collected else 1


def _run(root: Path, groups: list[list[str]], argv: list[str], env: dict) -> tuple[int, bool]:
    status, collected = 0, False
    for n, group in enumerate(groups, 1):
        print(f"== tests, group {n}/{len(groups)}: {' '.join(Path(f).stem for f in group)}", flush=True)
        # --durations: the slowest tests of each group in the log, to keep the suite's time in view.
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "--capture=sys", "--durations=8", *argv, *group],
                             cwd=root, env=env)
        if rc != NO_TESTS:
            collected = True
            if rc != 0 and status == 0:
                status = rc
        if rc not in (0, NO_TESTS):
            print(f"== group {n} failed with exit status {rc}", flush=True)
    return status, collected


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
