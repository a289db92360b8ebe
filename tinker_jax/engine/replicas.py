"""One engine over several processes: the leader's decisions, replayed by every other process (see
tinker_jax.distributed for the runtime and the log).

- `Processes`: this engine's link to the others: the round log, whether this process leads, the device turn (one
  order of device programs for the whole mesh), and names and seeds that every process draws alike.
- `Mirrors`: on a follower, the futures of this process's own engine calls (the in-process API runs the same script
  on every process), matched to the leader's requests by their position in a base model's log, and resolved by this
  process's own execution of them: results are equal on every process because every process computed them.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import random
import secrets
import threading
import time
from concurrent.futures import Future, InvalidStateError
from typing import Callable, TypeVar

import numpy as np

from tinker_jax import distributed
from tinker_jax.errors import UserError

T = TypeVar("T")
log = logging.getLogger("tinker_jax.engine")

# What a multi-process engine runs (every request kind of a worker's queue; samples go through the sampler steps).
SUPPORTED_KINDS = ("create", "forward", "forward_backward", "optim_step", "unload", "save", "load", "open_snapshot",
                   "change")


class Processes:
    """`gone` (leader): why the engine can no longer run, once a follower stopped beating for `heartbeat_timeout_s`
    (None while all live); `on_gone` callbacks run once, with that message, on the watchdog's thread."""

    def __init__(self, heartbeat_timeout_s: float = 20.0):
        from jax.experimental import multihost_utils

        # Every process names runs and draws LoRA seeds alike (a collective, once, at start): model ids and adapter
        # initialisations must agree or the replicas diverge. The epoch also names this engine's round log.
        self.epoch = int(multihost_utils.broadcast_one_to_all(np.array(secrets.randbits(31), np.int64)))
        self.log = distributed.RoundLog(namespace=f"{self.epoch:08x}")
        self.leader = distributed.is_leader()
        self.pid, self.count = self.log.pid, self.log.count
        self._names = itertools.count(1)
        self._names_lock = threading.Lock()
        # The leader holds this from publishing a decision until its device programs are queued: the processes of a
        # global mesh must launch the same programs in the same order, whichever base model's thread decided them.
        self.turn = threading.Lock()
        self._stopped = threading.Event()
        self.timeout_s = float(heartbeat_timeout_s)
        self.gone: str | None = None
        self._gone = threading.Event()
        self._on_gone: list[Callable[[str], None]] = []
        if self.leader:
            threading.Thread(target=self._watch, name="tinker-jax-watchdog", daemon=True).start()
        else:  # the leader's watchdog reads these beats
            self.log.beat()
            threading.Thread(target=self._beat, name="tinker-jax-beat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stopped.wait(self.timeout_s / 4):
            try:
                self.log.beat()
            except Exception:  # noqa: BLE001 - the leader is gone: the follower loop reports it
                return

    def wait_gone(self, timeout: float) -> str | None:
        """`gone`, waiting up to `timeout` seconds for the watchdog's verdict (None: all processes live)."""
        self._gone.wait(timeout)
        return self.gone

    def on_gone(self, fn: Callable[[str], None]) -> None:
        self._on_gone.append(fn)

    def _watch(self, every_s: float = 1.0) -> None:
        """Leader: a follower whose beat has not changed for `timeout_s` (on this process's clock) is gone. JAX's
        own heartbeat notices too, but only reports it (recoverability, see distributed.initialize); the engine
        then fails what is in flight and refuses new work, naming the process, and /healthz says so."""
        seen = {p: (None, time.monotonic()) for p in range(1, self.count)}
        while not self._stopped.wait(every_s):
            for p, (beat, since) in list(seen.items()):
                now, latest = time.monotonic(), self.log.last_beat(p)
                if latest != beat:
                    seen[p] = (latest, now)
                elif now - since > self.timeout_s:
                    self._lost(f"process {p} of {self.count} of the engine stopped (no heartbeat for "
                               f"{now - since:.0f} s): the engine cannot run on its mesh; restart the job")
                    return

    def _lost(self, why: str) -> None:
        log.error("%s", why)
        self.gone = why
        self._gone.set()
        for fn in self._on_gone:
            try:
                fn(why)
            except Exception:  # noqa: BLE001 - one callback's failure must not hide the death from the others
                log.exception("reacting to a lost process failed")

    def stop(self) -> None:
        self._stopped.set()

    def token(self, *parts) -> str:
        """8 hex digits, the same on every process for the same `parts` (a staging directory's name)."""
        return hashlib.sha256(repr((self.epoch, parts)).encode()).hexdigest()[:8]

    def settle(self, check: Callable[[], T], share: bool = False) -> T | None:
        """Inside a round: a decision that only the leader can make (its registry, its quota, its commit). The
        leader runs `check` and publishes the outcome as the log's next message (it holds the turn, so nothing
        comes between); a follower reads it from its replay. Every process then goes on together, or raises the
        same error: a follower never starts a collective write that the leader refused. -> check's value on the
        leader; on a follower, the same value when `share` (it must pickle), else None."""
        if self.leader:
            try:
                value = check()
            except UserError as e:
                self.log.publish(("outcome", e))
                raise
            except BaseException as e:
                self.log.publish(("outcome", RuntimeError(f"process 0 failed: {type(e).__name__}: {e}")))
                raise
            self.log.publish(("outcome", None, value if share else None))
            return value
        msg = self.log.next()
        if not (isinstance(msg, tuple) and msg[:1] == ("outcome",)):
            raise RuntimeError(f"out of step with the leader: expected an outcome, got {msg!r:.200}")
        if msg[1] is not None:
            raise msg[1]
        return msg[2]

    def barrier(self, name: str, timeout_s: float = 600.0) -> None:
        """Wait until every process reaches `name` (named alike on every process, never reused)."""
        self.log.barrier(name, timeout_s)

    def draw(self) -> tuple[str, int]:
        """A run id and a seed, the same on every process for the same call (calls are made in the same order)."""
        with self._names_lock:
            n = next(self._names)
        return f"run-{self.epoch:08x}-{n}", random.Random(f"{self.epoch}/{n}").getrandbits(32)


class Mirrors:
    """Follower side of one base model's log: `claim` (this process's call, in submission order) and `executed`
    (the leader's request `seq`, replayed here) meet on the same sequence number, in either order."""

    def __init__(self, keep: int = 4096):
        self._lock = threading.Lock()
        self._next = itertools.count(1)
        self._waiting: dict[int, Future] = {}  # claimed, not yet executed
        self._done: collections.OrderedDict[int, Future] = collections.OrderedDict()  # executed, not yet claimed
        self._keep = keep  # a follower behind a REST leader never claims anything: keep a bounded tail

    def claim(self, fut: Future) -> None:
        with self._lock:
            seq = next(self._next)
            src = self._done.pop(seq, None)
            if src is None:
                self._waiting[seq] = fut
        if src is not None:
            _chain(src, fut)

    def executed(self, seq: int) -> Future:
        """The future the replay of request `seq` resolves: never cancelled by a local caller (every process must run
        every request the leader ran), its outcome copied to the local call's future."""
        f: Future = Future()
        with self._lock:
            dst = self._waiting.pop(seq, None)
            if dst is None:
                self._done[seq] = f
                while len(self._done) > self._keep:
                    self._done.popitem(last=False)
        if dst is not None:
            _chain(f, dst)
        return f


def _chain(src: Future, dst: Future) -> None:
    def copy(s: Future) -> None:
        try:
            if s.exception() is not None:
                dst.set_exception(s.exception())
            else:
                dst.set_result(s.result())
        except InvalidStateError:  # the local caller cancelled it
            pass

    src.add_done_callback(copy)
