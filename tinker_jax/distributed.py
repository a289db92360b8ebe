"""Several processes, one engine: JAX's own distributed runtime (`jax.distributed`), one global mesh, SPMD.

Process 0 (the leader) decides what runs: its workers' schedulers form rounds as on one process. Before a round
runs, its decision (which requests, by their position in the log) is published on the `RoundLog`, an ordered log
kept in the coordination service's key-value store that `jax.distributed` already runs (no second RPC system).
Every other process (a follower) reads the log in order and runs the same rounds with the same jitted functions
over the global mesh; results come back to the host only as far as replies need (`fetch`).

Why a key-value log and not a collective for the decisions: a follower waiting for the next round must be able to
wait indefinitely (an idle server) and to notice a dead leader, which a blocked collective cannot do.

Nothing here changes global JAX state at import: `initialize` does, when a config asks for several processes.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from dataclasses import dataclass, replace
from typing import Any, Mapping

import jax
import numpy as np

log = logging.getLogger("tinker_jax.distributed")

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "TINKER_JAX_COORDINATOR", "TINKER_JAX_NUM_PROCESSES", "TINKER_JAX_PROCESS_ID")
_PREFIX = "tinker_jax/log"
_KEEP = 256  # published messages kept before the oldest read by every process are deleted


@dataclass(frozen=True)
class DistributedConfig:
    """How this process joins the others. All unset: one process. `from_env`: let `jax.distributed.initialize()`
    read them from the environment (TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID)."""

    coordinator: str | None = None  # HOST:PORT of process 0's coordination service
    num_processes: int | None = None
    process_id: int | None = None
    from_env: bool = False
    init_timeout_s: int = 300  # how long to wait for every process to join
    heartbeat_timeout_s: int = 20  # a process silent this long is declared dead (by process 0 and by JAX)
    # A cross-process collective waiting this long for a peer fails instead of blocking (CPU / gloo; a slow peer,
    # e.g. one still compiling, must never take this long)
    collective_timeout_s: int = 300

    def __post_init__(self):
        explicit = (self.coordinator, self.num_processes, self.process_id)
        if any(x is not None for x in explicit) and not all(x is not None for x in explicit):
            raise ValueError("distributed: coordinator, num_processes and process_id go together (or from_env)")
        if self.num_processes is not None and not (self.num_processes >= 1 and
                                                   0 <= self.process_id < self.num_processes):
            raise ValueError(f"distributed: process_id {self.process_id} is not in [0, {self.num_processes})")

    @property
    def enabled(self) -> bool:
        return self.from_env or (self.num_processes or 1) > 1

    def resolved(self) -> "DistributedConfig":
        """This config, or (when it names no processes) the one in the environment: TINKER_JAX_COORDINATOR,
        TINKER_JAX_NUM_PROCESSES and TINKER_JAX_PROCESS_ID, as `scripts/local_cluster.py` sets them. With
        `from_env` and none of those, jax.distributed finds its cluster itself (TPU pod, SLURM, Open MPI)."""
        if self.num_processes is not None or not os.environ.get(ENV_NUM_PROCESSES):
            return self
        try:
            return replace(self, coordinator=os.environ[ENV_COORDINATOR],
                           num_processes=int(os.environ[ENV_NUM_PROCESSES]),
                           process_id=int(os.environ[ENV_PROCESS_ID]), from_env=False)
        except (KeyError, ValueError) as e:
            raise ValueError(f"distributed: {ENV_NUM_PROCESSES} is set, so {ENV_COORDINATOR} and {ENV_PROCESS_ID} "
                             f"must be too ({e})") from None

    @staticmethod
    def from_dict(d: Mapping | None) -> "DistributedConfig":
        d = dict(d or {})
        known = {"coordinator", "num_processes", "process_id", "from_env", "init_timeout_s", "heartbeat_timeout_s",
                 "collective_timeout_s"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"distributed: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return DistributedConfig(**d)


_init_lock = threading.Lock()


def initialize(cfg: DistributedConfig) -> None:
    """Join the other processes (once per process; a second call with the same config does nothing). On CPU the
    cross-process collectives go through gloo."""
    cfg = cfg.resolved()
    if not cfg.enabled:
        return
    with _init_lock:
        if _client() is not None:  # not jax.process_count(): that would start the backend before joining
            return
        # Only the CPU backend reads these (GPUs and TPUs have their own collectives); set before the backend
        # starts. Without a timeout a collective whose peer died blocks for 30 minutes.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_collective_timeout_seconds" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_collective_timeout_seconds={cfg.collective_timeout_s}".strip()
        # A dead follower must not take process 0 (the front door) with it: the coordination service (run by process
        # 0) then reports the missed heartbeat instead of aborting every process; process 0 notices the death
        # itself (replicas.Processes) and refuses work naming the process. Only process 0's setting matters.
        try:
            jax.config.update("jax_enable_recoverability", True)
        except AttributeError:  # a JAX without it: a follower's death ends the job (the supervisor restarts it)
            log.warning("this JAX has no jax_enable_recoverability: a dead follower will stop process 0 too")
        kwargs: dict[str, Any] = {"initialization_timeout": cfg.init_timeout_s,
                                  "heartbeat_timeout_seconds": cfg.heartbeat_timeout_s}
        if not cfg.from_env:
            kwargs.update(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                          process_id=cfg.process_id)
        jax.distributed.initialize(**kwargs)
        log.info("process %d of %d joined (%d devices, %d local)", jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.local_device_count())


def shutdown(together: bool = True, timeout_s: float = 120.0) -> None:
    """Leave the other processes (every process calls it). Safe to call twice.

    together: first wait for every process to arrive (a barrier), and on process 0 then wait for the others to
    disconnect before leaving itself: the coordination service lives in process 0, and a follower still leaving
    when it goes would abort. (With recoverable tasks, see `initialize`, JAX's own shutdown no longer waits.)
    False on a process 0 that knows a process is gone: it leaves at once."""
    with _init_lock:
        client = _client()
        if client is None:
            return
        if together:
            try:
                client.wait_at_barrier("tinker_jax/shutdown", int(timeout_s * 1000))
                if is_leader():  # returns once the others have disconnected (it counts live processes only)
                    waiter = threading.Thread(target=client.get_live_nodes, args=(list(range(jax.process_count())),),
                                              daemon=True)
                    waiter.start()
                    waiter.join(timeout_s)
            except Exception as e:  # noqa: BLE001 - a process gone or stuck: leave anyway
                log.warning("waiting for the other processes to leave: %s", e)
        try:
            jax.distributed.shutdown()
        except Exception as e:  # noqa: BLE001 - a process already gone: nothing left to leave
            log.warning("leaving the other processes: %s", e)


def _client():
    """The coordination service client of this process (None on one process). A private JAX object: every use of
    it is in this module."""
    from jax._src import distributed as jd

    return jd.global_state.client


def multi_process() -> bool:
    return jax.process_count() > 1


def is_leader() -> bool:
    return jax.process_index() == 0


def fetch(tree: Any) -> Any:
    """Bring device results to this process's host as numpy: arrays held partly by other processes are gathered
    (a collective: every process calls this at the same point, which SPMD execution guarantees); others are read
    locally, as jax.device_get does."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


class ProcessGone(RuntimeError):
    """Another process of the engine stopped: nothing more can run on the global mesh."""


class RoundLog:
    """The leader's decisions, in order, for every process. `publish` (leader) appends one picklable message;
    `next` (followers) returns the next one, waiting as long as needed while checking that the leader lives.

    Message n lives at key `{_PREFIX}/{n}`; each follower acknowledges what it has read (`{_PREFIX}/ack/{pid}`)
    and the leader deletes messages older than every acknowledgement (keeping `_KEEP`), so the store stays small
    on a server that runs for months."""

    def __init__(self, namespace: str = "", poll_s: float = 1.0):
        # One engine's log: a later engine in the same job never reads an earlier one's messages.
        self._prefix = f"{_PREFIX}/{namespace}" if namespace else _PREFIX
        self._client = _client()
        if self._client is None:
            raise RuntimeError("RoundLog needs jax.distributed (several processes)")
        self._n = 0
        self._beats = 0  # this process's beats so far (the value of its beat key)
        self._deleted = 0
        self._lock = threading.Lock()  # leader: message numbers in publish order (one small RPC under it)
        self._poll_ms = int(poll_s * 1000)
        self.pid, self.count = jax.process_index(), jax.process_count()

    def publish(self, message: Any) -> int:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            self._n += 1
            self._client.key_value_set_bytes(f"{self._prefix}/{self._n}", data)
            n = self._n
            if n % _KEEP == 0:
                self._collect(n)
        return n

    def _collect(self, n: int) -> None:
        upto = min([self._acked(p) for p in range(1, self.count)] + [n - _KEEP])
        for k in range(self._deleted + 1, upto + 1):
            self._client.key_value_delete(f"{self._prefix}/{k}")
        self._deleted = max(self._deleted, upto)

    def _acked(self, p: int) -> int:
        try:
            return int(self._client.key_value_try_get(f"{self._prefix}/ack/{p}"))
        except Exception:  # noqa: BLE001 - NOT_FOUND: that follower has read nothing yet
            return 0

    def next(self, stopping: threading.Event | None = None) -> Any:
        """The next message (followers). Raises ProcessGone if the leader's coordination service goes away; returns
        None if `stopping` is set while waiting."""
        n = self._n + 1
        while True:
            if stopping is not None and stopping.is_set():
                return None
            try:
                data = self._client.blocking_key_value_get_bytes(f"{self._prefix}/{n}", self._poll_ms)
                break
            except Exception as e:  # noqa: BLE001 - DEADLINE_EXCEEDED: nothing yet; anything else: the service
                if "DEADLINE" not in str(e).upper():
                    raise ProcessGone(f"process 0 (the leader) is unreachable: {e}") from e
        self._n = n
        self._client.key_value_set(f"{self._prefix}/ack/{self.pid}", str(n), allow_overwrite=True)
        return pickle.loads(data)

    def barrier(self, name: str, timeout_s: float) -> None:
        """Every process waits here until all have reached `name` (a name never used before in this log)."""
        self._client.wait_at_barrier(f"{self._prefix}/barrier/{name}", int(timeout_s * 1000))

    def beat(self) -> None:
        """This process is alive (followers call it every few seconds, from a thread of their own, so a long round
        does not look like a death). Not jax's get_live_nodes: that is a barrier every process must enter."""
        self._beats += 1
        self._client.key_value_set(f"{self._prefix}/beat/{self.pid}", str(self._beats), allow_overwrite=True)

    def last_beat(self, pid: int) -> str | None:
        """Process `pid`'s latest beat (a counter: compared for change on the reader's clock, never against the
        writer's), None before its first."""
        try:
            return self._client.key_value_try_get(f"{self._prefix}/beat/{pid}")
        except Exception:  # noqa: BLE001 - NOT_FOUND: not yet
            return None
