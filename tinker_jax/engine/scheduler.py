"""The request log of one base model and the policy that turns it into rounds of device work.

Every engine operation is a typed `Request` appended to its base model's log. Ordering rules:
- requests of one training run execute in submission order (its queue is FIFO); optim_step, save, load and every
  other non-batchable request is a barrier: it runs alone, after everything of the run submitted before it;
- requests touching one checkpoint path run in submission order across runs (`after`: a read waits for the save
  submitted before it, a delete for the reads);
- across runs the scheduler is free.

A round takes, in fair order, the next request of every run that has one ready: a barrier request alone, or its
leading forward/forward_backward requests. Forward/forward_backward requests of all runs in a round become one
batch (batching.plan mixes them into micro-batches). Fairness is two-level round robin: tenants (a REST session,
or "local" in process) in rotation, and each tenant's runs in rotation; every ready run gets one request into a
round before any run gets a second, and the round's token budget stops the first pass only after at least one
request. Runs left out by the budget are first in the next round. So a tenant that floods the log delays another
tenant's request by at most one round.

This module holds no device state and starts no threads: the worker (engine.worker) asks it for rounds.
"""

from __future__ import annotations

import collections
import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Iterable

BATCHABLE = ("forward", "forward_backward")


@dataclass(eq=False)
class Request:
    """One engine operation: `kind` names it, `body` is its typed payload (engine.requests)."""

    kind: str
    body: Any
    future: Future
    run: str | None = None  # ordering key: one run's requests execute in submission order
    tenant: str = "local"  # fairness key
    tokens: int = 0  # cost against a round's token budget (forward / forward_backward)
    after: tuple[Future, ...] = ()  # must not start before these are done (checkpoint path order)
    seq: int = 0  # position in the log (set by push)
    round: int = 0  # the round that ran it (set by the worker)

    @property
    def batchable(self) -> bool:
        return self.kind in BATCHABLE

    def ready(self) -> bool:
        return all(f.done() for f in self.after)


@dataclass
class Round:
    number: int
    ops: list[Request] = field(default_factory=list)  # barrier requests, each runs alone
    batch: list[Request] = field(default_factory=list)  # forward / forward_backward requests of any runs

    def __bool__(self) -> bool:
        return bool(self.ops or self.batch)


class Scheduler:
    def __init__(self, round_tokens: int):
        self.round_tokens = int(round_tokens)
        self._seq = itertools.count(1)
        self._runs: dict[Any, collections.deque[Request]] = {}  # ordering key -> FIFO of its requests
        self._tenant_of: dict[Any, str] = {}
        self._tenants: collections.OrderedDict[str, collections.OrderedDict[Any, None]] = collections.OrderedDict()
        self._arrived: dict[Any, float] = {}  # run -> when it last submitted (monotonic)
        self.rounds = 0  # rounds handed out so far
        self.pushed = 0  # requests pushed so far

    def take_seq(self) -> int:
        """A place in the log for a request that does not queue here (a sample, queued by the sampler)."""
        return next(self._seq)

    def push(self, req: Request) -> None:
        req.seq = next(self._seq)
        self.pushed += 1
        key = req.run if req.run is not None else ("op", req.seq)  # a request of no run is its own queue
        if req.run is not None:
            self._arrived[req.run] = time.monotonic()
        q = self._runs.setdefault(key, collections.deque())
        q.append(req)
        self._tenant_of.setdefault(key, req.tenant)
        self._tenants.setdefault(self._tenant_of[key], collections.OrderedDict()).setdefault(key, None)

    def __len__(self) -> int:
        return sum(len(q) for q in self._runs.values())

    def queued(self, run: Any) -> list[Request]:
        return list(self._runs.get(run, ()))

    def ready(self) -> bool:
        return any(q and self._head_ready(q) for q in self._runs.values())

    def stragglers(self, within_s: float) -> int:
        """Runs that submitted within the last `within_s` seconds but have nothing ready now: tenants in the middle
        of a loop (waiting on their previous result) whose next request is about to arrive."""
        now = time.monotonic()
        for run in [r for r, t in self._arrived.items() if now - t > within_s]:
            del self._arrived[run]
        return sum(1 for run in self._arrived if not (self._runs.get(run) and self._head_ready(self._runs[run])))

    def _head_ready(self, q) -> bool:
        head = q[0]
        if head.future.cancelled():
            return True  # dropped when picked
        return head.ready()

    def drop(self, run: Any) -> list[Request]:
        """Remove and return every queued request of `run` (its run failed or was unloaded)."""
        q = self._runs.pop(run, collections.deque())
        self._forget(run)
        return list(q)

    def _forget(self, key: Any) -> None:
        tenant = self._tenant_of.pop(key, None)
        if tenant is not None:
            runs = self._tenants.get(tenant)
            if runs is not None:
                runs.pop(key, None)
                if not runs:
                    del self._tenants[tenant]

    def next_round(self) -> Round:
        """The next round of work (empty when nothing is ready). Cancelled requests are dropped on the way."""
        self.rounds += 1
        if self.rounds % 64 == 0:  # forget runs that went quiet (stragglers() does this too, when it is used)
            now = time.monotonic()
            for run in [r for r, t in self._arrived.items() if now - t > 60.0]:
                del self._arrived[run]
        rnd = Round(self.rounds)
        budget = self.round_tokens
        served_tenants: list[str] = []
        batched: list[Any] = []
        stop = False
        for tenant in list(self._tenants):
            if stop:
                break
            runs = self._tenants[tenant]
            served = []
            for key in list(runs):
                q = self._runs.get(key)
                while q and q[0].future.cancelled():
                    q.popleft()
                if not q or not q[0].ready():
                    continue
                head = q[0]
                if head.batchable:
                    if rnd.batch and head.tokens > budget:
                        stop = True  # the budget is spent: this run goes first next round
                        break
                    budget -= head.tokens
                    rnd.batch.append(q.popleft())
                    batched.append(key)
                else:
                    rnd.ops.append(q.popleft())
                served.append(key)
            for key in served:  # rotation: served runs go to the back of their tenant's order
                runs.move_to_end(key)
            if served:
                served_tenants.append(tenant)
        for key in batched:  # second pass: more of the same runs' leading batchable requests, while budget lasts
            q = self._runs.get(key)
            while q and q[0].batchable and q[0].ready() and not q[0].future.cancelled() and q[0].tokens <= budget:
                budget -= q[0].tokens
                rnd.batch.append(q.popleft())
        for tenant in served_tenants:
            if tenant in self._tenants:
                self._tenants.move_to_end(tenant)
        for key in [k for k, q in self._runs.items() if not q]:
            del self._runs[key]
            self._forget(key)
        return rnd

    def all_requests(self) -> Iterable[Request]:
        for q in self._runs.values():
            yield from q
