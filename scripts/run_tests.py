"""Run the test suite as a few pytest processes in turn (what `make test`, and so CI, runs).

Why several processes: one pytest process for the whole suite accumulates every test's compiled XLA programs, models
and threads for 15 minutes, and two CI runs of that process died with SIGABRT in native code late in the run (once
in the interpreter's teardown after every test had passed, once inside an XLA compile), with the native message lost
to pytest's output capture. Smaller processes hold less, and `--capture=sys` leaves native stderr (XLA's own
messages, an abort's reason) in the log.

Groups: the test files in name order, cut into GROUPS consecutive chunks, run JOBS at a time (default: 2, or one
per CPU core when fewer; TINKER_JAX_TEST_JOBS sets it), the next waiting group starting whenever one ends. Why two
at once on a 2-core machine: most of the suite's time is XLA compiling tiny models' programs, one thread per
compile, and waiting on servers and child processes, so a single pytest process leaves a core idle most of the
time. Each group's output is printed whole when it ends (so the log does not interleave). Every group runs even
when another fails; the exit status is the failing group's that comes first in order (pytest's codes), or 1 when no
group collected a test.

One XLA compilation cache for every group (JAX's persistent cache in a temporary directory, every program cached
whatever its compile time): most of the suite's time is compiling tiny models' programs, and groups compile many of
the same ones (a warm cache ran group 4 in 57 s instead of 168 s). Groups running at once share it: an entry read
while another process writes it fails its check and is compiled again (JAX warns; nothing else). Tests that start
processes of their own with jax.distributed leave it out of those processes' environment.

XLA's CPU backend optimisation off in every group (models_util.FAST_XLA, as XLA_FLAGS, unless the caller sets
XLA_FLAGS or TINKER_JAX_TEST_XLA=default): the tests compile far more than they run, and these flags cut a tiny
model's compile several-fold (tests/test_multitenant.py: 140 s -> 61 s); the optimised HLO is the same (only the
machine code is less optimised), fp32 results agree with default compilation to ~1e-6. Parity tests already compiled this way (models_util.fast_jit). The flags
are debug options that a jaxlib may rename, so one short process tries them first; if it fails, the groups compile
with XLA's defaults and the log says so. What still compiles with the defaults: processes that tests start with an
environment of their own (tests/test_sampling.py's script that ends mid-decode), benchmarks and `make test-gpu-prep`.

Usage: python scripts/run_tests.py [pytest args...]   (e.g. -m "not gpu_prep", -k moe)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GROUPS = 8
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
DEVICES_FLAG = "--xla_force_host_platform_device_count=8"  # as tests/conftest.py: the mesh tests need 8 devices
NO_TESTS = 5  # pytest: nothing collected


def main(argv: list[str]) -> int:
    # Terminated (a CI time limit, a kill): unwind, so the running groups are stopped and the cache removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
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
    _fast_xla(env)
    try:
        status, collected = _run(root, groups, argv, env)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"== {len(groups)} groups in {time.monotonic() - t0:.0f} s: "
          f"{'passed' if status == 0 and collected else 'FAILED' if status else 'no tests collected'}", flush=True)
    return status if collected else 1


def _fast_xla(env: dict) -> None:
    """XLA_FLAGS for the groups: 8 devices and FAST_XLA_FLAGS, if this jaxlib accepts them (it aborts on a flag it
    does not know)."""
    if "XLA_FLAGS" in env or env.get("TINKER_JAX_TEST_XLA") == "default":
        return
    flags = f"{DEVICES_FLAG} {FAST_XLA_FLAGS}"
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0).block_until_ready()"],
                           env={**env, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                           timeout=300)
    if probe.returncode == 0:
        env["XLA_FLAGS"] = flags
        print(f"== XLA_FLAGS={flags}", flush=True)
    else:
        print(f"== XLA's default compilation: this jaxlib refused {FAST_XLA_FLAGS}: {probe.stderr[-500:]}", flush=True)


def _jobs() -> int:
    v = os.environ.get("TINKER_JAX_TEST_JOBS")
    if v is not None:
        if not v.isdigit() or int(v) < 1:
            raise SystemExit(f"TINKER_JAX_TEST_JOBS: expected a positive number of groups to run at once, got {v!r}")
        return int(v)
    return max(1, min(2, os.cpu_count() or 1))


def _run(root: Path, groups: list[list[str]], argv: list[str], env: dict) -> tuple[int, bool]:
    jobs = _jobs()
    print(f"== {len(groups)} groups of test files, {jobs} at a time", flush=True)
    waiting = list(enumerate(groups, 1))
    running: dict[int, tuple[subprocess.Popen, object, float]] = {}
    codes: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="tinker-jax-tests-log-") as logs:
        try:
            _loop(groups, argv, env, root, Path(logs), jobs, waiting, running, codes)
        finally:  # interrupted (or this runner failed): no group outlives it
            for proc, out, _ in running.values():
                proc.kill()
                proc.wait()
                out.close()
    failed = [codes[n] for n in sorted(codes) if codes[n] not in (0, NO_TESTS)]
    return (failed[0] if failed else 0), any(c != NO_TESTS for c in codes.values())


def _loop(groups, argv, env, root, logs: Path, jobs: int, waiting: list, running: dict, codes: dict) -> None:
    """Start waiting groups while fewer than `jobs` run; print each group's output when it ends."""
    while waiting or running:
        while waiting and len(running) < jobs:
            n, group = waiting.pop(0)
            out = open(logs / f"{n}.log", "w+b")  # noqa: SIM115 - closed when the group ends
            # --durations: the slowest tests of each group in the log, to keep the suite's time in view.
            proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "--capture=sys", "--durations=8",
                                     *argv, *group], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
            running[n] = (proc, out, time.monotonic())
        time.sleep(0.5)
        for n in [n for n, (proc, _, _) in running.items() if proc.poll() is not None]:
            proc, out, t0 = running.pop(n)
            codes[n] = proc.returncode
            out.seek(0)
            print(f"== tests, group {n}/{len(groups)} ({time.monotonic() - t0:.0f} s): "
                  f"{' '.join(Path(f).stem for f in groups[n - 1])}", flush=True)
            sys.stdout.buffer.write(out.read())
            out.close()
            if proc.returncode not in (0, NO_TESTS):
                print(f"== group {n} failed with exit status {proc.returncode}", flush=True)
            sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
