"""Timing: median over repeated timed runs after warm-up, with the spread; and what machine / versions ran it."""

from __future__ import annotations

import os
import platform
import socket
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Callable

import numpy as np


@dataclass
class Stat:
    """Samples of one figure (seconds, tokens/s, ms, ...): the median is the reported value."""

    samples: list[float]

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples, q))

    def map(self, fn: Callable[[float], float]) -> "Stat":
        return Stat([fn(x) for x in self.samples])

    def spread(self) -> dict:
        s = np.asarray(self.samples, dtype=float)
        med = float(np.median(s))
        return {"n": int(s.size), "median": med, "min": float(s.min()), "max": float(s.max()),
                "iqr": float(np.percentile(s, 75) - np.percentile(s, 25)),
                "rel_range": float((s.max() - s.min()) / med) if med else None}


def time_runs(fn: Callable[[], object], *, warmup: int, repeats: int) -> Stat:
    """Seconds per call of `fn` (which must block until its work is done), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return Stat(out)


def interleave(steps: dict[str, Callable[[], object]], *, warmup: int, repeats: int
               ) -> tuple[dict[str, list[tuple[float, object]]], dict[str, BaseException]]:
    """Call the steps in turn (a, b, a, b, ...): `warmup` untimed rounds, then `repeats` timed rounds, so that load
    from other processes drifts over all contenders alike (a paired comparison). A step that raises is dropped.
    -> (name -> [(seconds, return value) of each timed call], name -> the exception that dropped it)."""
    live, failed = dict(steps), {}
    timed: dict[str, list[tuple[float, object]]] = {k: [] for k in steps}
    for i in range(warmup + max(1, repeats)):
        for name, fn in list(live.items()):
            t0 = time.perf_counter()
            try:
                ret = fn()
            except Exception as e:  # noqa: BLE001 - reported by the caller as this contender's figure
                failed[name] = e
                del live[name]
                continue
            if i >= warmup:
                timed[name].append((time.perf_counter() - t0, ret))
    return {k: v for k, v in timed.items() if k not in failed}, failed


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _accelerators() -> list[str]:
    try:
        import jax

        devs = jax.devices()
        return [f"{d.platform}:{getattr(d, 'device_kind', '?')}" for d in devs]
    except Exception as e:  # noqa: BLE001 - a record, never a failure
        return [f"jax devices unavailable: {e}"]


def machine_info() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gib": mem, "loadavg_at_start": load, "devices": _accelerators(),
            "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS",
                                                   "XLA_PYTHON_CLIENT_PREALLOCATE")},
            "torch_threads": _torch_threads()}


def _torch_threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except Exception:  # noqa: BLE001
        return None


VERSIONED = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "tinker", "tinker-jax", "fastapi",
             "uvicorn", "numpy", "skyrl-tx")


def versions() -> dict:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
