"""Sampling sessions (durable, in the store) -> engine sampler snapshots (in memory, one engine's lifetime).

The store remembers what a sampling session samples from (a tinker path, a base model, or a training model's
weights at the time of an ephemeral save); the engine holds the weight snapshots. This table links the two and
bounds the memory snapshots take:
- Path- and base-model-backed sessions are rebuilt from disk on demand, so they survive a server restart and can be
  evicted freely.
- An ephemeral session (`save_weights_and_get_sampling_client`) exists only in memory; after a restart or
  eviction it fails with a message saying so.
- Each session keeps at most `max_per_session` snapshots (least recently used evicted first): an RL loop makes a
  new sampler every step and never says when it drops the old one.
- A named `save_weights_for_sampler` already builds a snapshot; it is parked under its path, so the
  `create_sampling_client(path)` that usually follows reuses it instead of reloading the checkpoint.
- A path-backed session is authorized again (`access.readable_checkpoint`, for the caller, who owns the session)
  each time its snapshot is rebuilt or taken from the parked ones: the checkpoint may have been unpublished, or
  deleted and saved again as another key's private weights, since the session was opened. A refusal reads exactly
  like a checkpoint that does not exist.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import threading

from server.access import Caller, readable_checkpoint
from server.store import SamplingSessionRow
from tinker_jax.engine.api import EngineAPI
from tinker_jax.errors import NotFound

log = logging.getLogger(__name__)

MAX_PARKED = 64


class EngineSamplers:
    def __init__(self, engine: EngineAPI, max_per_session: int = 32):
        self.engine = engine
        self.max_per_session = max_per_session
        self._lock = threading.Lock()
        self._bound: dict[str, str] = {}  # sampling_session_id -> engine sampler id
        self._lru: dict[str, collections.OrderedDict[str, None]] = {}  # session_id -> its bound sampler ids
        # tinker path -> engine sampler id of its named save, not yet bound; oldest first, at most MAX_PARKED (a loop
        # saving step-N names for the sampler without ever sampling them must not keep every snapshot)
        self._parked: collections.OrderedDict[str, str] = collections.OrderedDict()
        # Building a sampler waits for its weights (a first model load can take minutes): on threads of its own, so
        # those waits never take the event loop's default pool that request decoding uses.
        self._builders = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="tinker-jax-sampler-open")

    # --- binding -------------------------------------------------------------------------------------------------

    def bind(self, row: SamplingSessionRow, engine_id: str) -> None:
        evicted: list[str] = []
        with self._lock:
            old = self._bound.get(row.sampling_session_id)
            self._bound[row.sampling_session_id] = engine_id
            lru = self._lru.setdefault(row.session_id, collections.OrderedDict())
            lru[row.sampling_session_id] = None
            lru.move_to_end(row.sampling_session_id)
            while len(lru) > self.max_per_session:
                victim, _ = lru.popitem(last=False)
                evicted.append(self._bound.pop(victim))
            if old is not None and old != engine_id:
                evicted.append(old)
        for eid in evicted:
            self._release_engine(eid)

    def park(self, path: str, engine_id: str) -> None:
        """A named sampler save's snapshot, kept until a sampling session takes it (or the path is replaced)."""
        with self._lock:
            stale = [self._parked.pop(path)] if path in self._parked else []
            self._parked[path] = engine_id
            while len(self._parked) > MAX_PARKED:
                stale.append(self._parked.popitem(last=False)[1])
        for eid in stale:
            self._release_engine(eid)

    def unpark(self, path: str) -> None:
        """The checkpoint at `path` was deleted or overwritten: its parked snapshot is stale."""
        with self._lock:
            old = self._parked.pop(path, None)
        if old is not None:
            self._release_engine(old)

    def _take_parked(self, path: str) -> str | None:
        with self._lock:
            return self._parked.pop(path, None)

    def lookup(self, row: SamplingSessionRow) -> str | None:
        with self._lock:
            eid = self._bound.get(row.sampling_session_id)
            if eid is not None:
                self._lru[row.session_id].move_to_end(row.sampling_session_id)
            return eid

    async def _build(self, **kwargs) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._builders, functools.partial(self.engine.create_sampler, **kwargs))

    async def resolve(self, row: SamplingSessionRow, caller: Caller) -> str:
        """The engine sampler of a sampling session, rebuilding a path/base-model one if needed. `caller` is the
        session's owner (the routes check that first); a path is rebuilt only while they may still read it.
        NotFound (a user error) when it cannot be rebuilt; Overloaded when the engine's queue is full."""
        eid = self.lookup(row)
        if eid is not None:
            return eid
        if row.model_path:
            loop = asyncio.get_running_loop()  # registry reads: off the event loop
            await loop.run_in_executor(self._builders, readable_checkpoint, self.engine, row.model_path, caller,
                                       "model_path")
            eid = self._take_parked(row.model_path)
            if eid is None:
                eid = await self._build(model_path=row.model_path, tenant=row.session_id)
        elif row.base_model and not row.model_id:
            eid = await self._build(base_model=row.base_model, tenant=row.session_id)
        else:
            raise NotFound(
                f"sampling_session_id: {row.sampling_session_id!r} sampled the in-memory weights of model "
                f"{row.model_id!r}, which are gone (the server restarted or the sampler was evicted); save the weights "
                "again and create a new sampling client")
        self.bind(row, eid)
        return eid

    # --- release -------------------------------------------------------------------------------------------------

    def release_session(self, session_id: str) -> int:
        with self._lock:
            lru = self._lru.pop(session_id, {})
            eids = [self._bound.pop(sid) for sid in lru if sid in self._bound]
        for eid in eids:
            self._release_engine(eid)
        return len(eids)

    def _release_engine(self, engine_id: str) -> None:
        try:
            self.engine.release_sampler(engine_id)
        except Exception:  # releasing is best effort; a leak is better than a failed request
            log.exception("releasing engine sampler %s failed", engine_id)
