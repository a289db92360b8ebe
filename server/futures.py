"""The future registry: engine `concurrent.futures.Future`s under string request ids, persisted in the store.

Submit routes call `register` (or `submit`, which also deduplicates retried submits on their sequence number);
when the engine future finishes, its result is encoded once (proto for fwd/bwd and sample results, JSON otherwise)
and stored, or its error is stored as `{"error", "category"}`: `UserError` -> "user", anything else -> "server"
(logged with its traceback; a plain ValueError is a bug too, see tinker_jax.errors). A "server" error carries the
exception's type only (its text may hold server paths; the log has it all); every message is passed through
`errors.redact` (the data directory never reaches a client).
Every future belongs to the key that submitted it: `retrieve`, `completions` and `cancel` take the caller's owner tag
and treat another key's request exactly like an unknown one.
`retrieve` long-polls without a busy loop: an asyncio.Event per waited id, set from the engine thread through
`call_soon_threadsafe` after the store write, so a waiter that re-reads the row after waking always sees the result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import collections
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from server import wire
from server.errors import ApiError, error_body, redact
from server.limits import LimitReached
from server.store import FutureRow, Store
from tinker_jax.errors import Overloaded, Stopped, Unavailable, UserError

log = logging.getLogger(__name__)

CLONE_STRIDE = 1_000_000_000  # sample seq_ids of clone c start at c * 1e9 (wire doc §1.7)


@dataclass(frozen=True)
class Reply:
    """What retrieve_future answers; the route turns it into an HTTP response."""

    status: int
    content_type: str
    body: bytes


class FutureRegistry:
    def __init__(self, store: Store, *, long_poll_s: float = 25.0, retrieve_futures_poll_s: float = 25.0,
                 private_paths: tuple[str, ...] = (), max_queued_per_key: int = 2048):
        self._store = store
        self.max_queued_per_key = max_queued_per_key
        self._private_paths = private_paths
        self.long_poll_s = long_poll_s
        self.retrieve_futures_poll_s = retrieve_futures_poll_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Both dicts are only touched on the event loop thread.
        self._waiters: dict[str, asyncio.Event] = {}
        self._sampler_waiters: dict[tuple[str, int], asyncio.Event] = {}
        # Engine futures still running, by request_id, so cancel_future can reach them (any thread; GIL-atomic ops).
        self._running: dict[str, concurrent.futures.Future] = {}
        # Unfinished requests per owner (the per-key queue limit). Counted here, not in the store: it is the engine's
        # queue that one key must not fill. The lock guards two integer updates only, never I/O.
        self._queued: collections.Counter[str] = collections.Counter()
        self._queued_lock = threading.Lock()
        # Encoding a result and writing it to the store happen here, not on the engine's device loop (which
        # completes the futures): a slow store must not stall training for every tenant. One thread keeps order.
        self._completions = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                  thread_name_prefix="tinker-jax-results")

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def close(self) -> None:
        """Stop recording completions (the store is about to close): those already handed over are recorded first;
        later engine callbacks are dropped (their requests read as lost at the next start)."""
        self._completions.shutdown(wait=True)  # a hand-off after this point is refused (_hand_off)
        self._closed = True

    # --- submit side ---------------------------------------------------------------------------------------------

    def register(self, future: concurrent.futures.Future, kind: str, *, owner: str, session_id: str | None = None,
                 model_id: str | None = None, sampling_session_id: str | None = None,
                 seq_id: int | None = None) -> str:
        """Track an already-started engine future under a new request_id. Samples should pass
        sampling_session_id and seq_id, which is how retrieve_futures finds them."""
        request_id, _ = self.submit(kind, lambda: future, owner=owner, session_id=session_id, model_id=model_id,
                                    sampling_session_id=sampling_session_id, seq_id=seq_id)
        return request_id

    def submit(self, kind: str, start: Callable[[], concurrent.futures.Future], *, owner: str,
               idempotency: tuple[str, str, int] | None = None, session_id: str | None = None,
               model_id: str | None = None, sampling_session_id: str | None = None,
               seq_id: int | None = None) -> tuple[str, bool]:
        """Run `start()` (which submits to the engine) unless `idempotency=(kind, scope, seq)` was seen before, e.g.
        ("train", model_id, seq_id) or ("sample", sampling_session_id, seq_id). Returns (request_id, started).
        The future belongs to `owner` (the caller's key tag).
        A UserError from `start()` becomes a failed future with category "user", so a retry sees the same error.
        `Overloaded` (nothing was queued), `LimitReached` and `ApiError` are re-raised after forgetting the request
        and its key: the route answers with that status and the SDK's retry of the same seq_id starts afresh, so the
        request still runs exactly once."""
        clone_id = None if sampling_session_id is None else (seq_id or 0) // CLONE_STRIDE
        request_id, created = self._store.insert_future(
            uuid.uuid4().hex, kind, owner=owner, idempotency=idempotency, session_id=session_id, model_id=model_id,
            sampling_session_id=sampling_session_id, clone_id=clone_id)
        if not created:
            return request_id, False
        sampler = None if sampling_session_id is None else (sampling_session_id, clone_id)
        try:
            self._admit(owner)
        except Overloaded:
            self._store.discard_future(request_id)
            raise
        try:
            future = start()
        except (Overloaded, LimitReached, ApiError):
            self._release(owner)
            self._store.discard_future(request_id)
            raise
        except UserError as e:
            self._release(owner)
            self._fail(request_id, str(e), "user", sampler)
        except Exception as e:
            self._release(owner)
            log.exception("submitting %s %s failed", kind, request_id)
            self._fail(request_id, server_error_message(e), "server", sampler)
        else:
            self._running[request_id] = future
            future.add_done_callback(lambda f: (self._release(owner), self._hand_off(request_id, kind, f, sampler)))
        return request_id, True

    def _admit(self, owner: str) -> None:
        """Count one more unfinished request of `owner`, or refuse it (429, retried by the SDK with the same seq_id):
        one key must not fill the engine's queues for every other key. Per session the engine has its own bound."""
        with self._queued_lock:
            n = self._queued[owner]
            if n >= self.max_queued_per_key:
                raise Overloaded(f"this API key has {n} requests in flight (limit {self.max_queued_per_key}, "
                                 "max_queued_per_key); retry when some finish")
            self._queued[owner] = n + 1

    def _release(self, owner: str) -> None:
        with self._queued_lock:
            self._queued[owner] -= 1
            if self._queued[owner] <= 0:
                del self._queued[owner]

    def queued(self, owner: str) -> int:
        """Unfinished requests of `owner` (for tests and the health report)."""
        with self._queued_lock:
            return self._queued[owner]

    def cancel(self, request_id: str, owner: str) -> bool:
        """Cancel a request of `owner` the engine has not started yet (cancel_future, §2.6); its future then fails
        with "the request was cancelled". Returns whether it was cancelled; a running or finished one, and another
        key's, are left alone."""
        future = self._running.get(request_id)
        if future is None:
            return False
        row = self._store.get_future(request_id, with_result=False)
        return row is not None and row.owner == owner and future.cancel()

    def _hand_off(self, request_id: str, kind: str, future: concurrent.futures.Future,
                  sampler: tuple[str, int] | None) -> None:
        """Runs on the thread that completed the future (the engine's, or this one if it was already done)."""
        if self._closed:
            return
        try:
            self._completions.submit(self._on_done, request_id, kind, future, sampler)
        except RuntimeError:  # closing: the store is going away
            pass

    def _on_done(self, request_id: str, kind: str, future: concurrent.futures.Future,
                 sampler: tuple[str, int] | None) -> None:
        """Runs on the results thread (_hand_off)."""
        self._running.pop(request_id, None)
        if self._closed:
            return
        try:
            self._record(request_id, kind, future, sampler)
        except Exception:  # e.g. the database broke: the client's poll then fails too, and /healthz says why
            log.exception("recording the result of %s %s failed", kind, request_id)

    def _record(self, request_id: str, kind: str, future: concurrent.futures.Future,
                sampler: tuple[str, int] | None) -> None:
        if future.cancelled():
            self._fail(request_id, "the request was cancelled", "server", sampler)
            return
        exc = future.exception()
        if isinstance(exc, Stopped):  # the engine's shutdown: as if the server had restarted under it
            self._store.lose_future(request_id)
            self._notify(request_id, sampler)
            return
        if isinstance(exc, UserError):
            self._fail(request_id, str(exc), "user", sampler)
            return
        if isinstance(exc, Unavailable):  # the server cannot work now; its message is meant for the client
            log.error("%s %s failed: %s", kind, request_id, exc)
            self._fail(request_id, str(exc), "server", sampler)
            return
        if exc is not None:
            log.error("%s %s failed", kind, request_id, exc_info=exc)
            self._fail(request_id, server_error_message(exc), "server", sampler)
            return
        try:
            encoded = wire.encode_result(kind, future.result())
        except Exception as e:  # an engine result the client could not parse is a server bug
            log.exception("encoding the %s result of %s failed", kind, request_id)
            self._fail(request_id, f"could not encode the result ({type(e).__name__}; see the server log)", "server",
                       sampler)
            return
        self._store.finish_future(request_id, encoded.content_type, encoded.body)
        self._notify(request_id, sampler)

    def _fail(self, request_id: str, message: str, category: str, sampler: tuple[str, int] | None) -> None:
        self._store.fail_future(request_id, redact(message, self._private_paths), category)
        self._notify(request_id, sampler)

    def _notify(self, request_id: str, sampler: tuple[str, int] | None) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._wake, request_id, sampler)
        except RuntimeError:  # loop shut down between the check and the call
            pass

    def _wake(self, request_id: str, sampler: tuple[str, int] | None) -> None:
        for waiters, key in ((self._waiters, request_id), (self._sampler_waiters, sampler)):
            event = waiters.pop(key, None) if key is not None else None
            if event is not None:
                event.set()

    # --- retrieve side -------------------------------------------------------------------------------------------

    async def retrieve(self, request_id: str, accept_proto: bool, timeout: float | None = None, *,
                       owner: str) -> Reply:
        """The retrieve_future answer (§3.2): the result, `{"error", "category"}`, or after `timeout` (default
        long_poll_s, under the SDK's 45 s read timeout) `{"type": "try_again", ...}`. 404 for an unknown request and
        for another key's."""
        loop = self._loop_now()
        deadline = loop.time() + (self.long_poll_s if timeout is None else timeout)
        while True:
            # Take the event before reading the row: a completion landing in between still sets this event.
            mine = request_id not in self._waiters
            event = self._waiters.setdefault(request_id, asyncio.Event())
            row = self._store.get_future(request_id)
            if row is None or row.owner != owner:
                if mine:  # nobody else waits on it (no await since it was made); the owner's waiters keep theirs
                    self._waiters.pop(request_id, None)
                raise ApiError(404, f"unknown request_id {request_id!r} (never submitted, or expired)")
            if row.status != "pending":
                return self._final_reply(row, accept_proto)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return _json_reply({"type": "try_again", "request_id": request_id, "queue_state": "active"})
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                pass  # loop once more: re-read the row, then answer try_again

    def _final_reply(self, row: FutureRow, accept_proto: bool) -> Reply:
        if row.status == "done":
            self._store.mark_retrieved([row.request_id], row.owner)
            assert row.result is not None and row.content_type is not None
            if row.content_type == wire.PROTO_CONTENT_TYPE and not accept_proto:
                return Reply(200, wire.JSON_CONTENT_TYPE, wire.downgrade_to_json(row.kind, row.result))
            return Reply(200, row.content_type, row.result)
        error = row.error or error_body("unknown failure", "server")
        if row.status == "lost" and row.kind == "sample":
            return _json_reply(error, status=410)  # 410: the SDK resubmits a sample whose promise is gone (§3.3)
        return _json_reply(error)

    async def completions(self, sampling_session_id: str, clone_id: int, prev_cursor: int,
                          timeout: float | None = None, retrieved: list[str] | None = None, *,
                          owner: str) -> dict[str, Any]:
        """The retrieve_futures answer (§3.6): completions of one sampler clone after `prev_cursor`, long-polling
        until there is at least one or `timeout` passes (0: answer at once; acks-only polls use that). The caller
        checks that the sampling session is `owner`'s; acknowledgements touch only `owner`'s futures."""
        if retrieved:
            self._store.mark_retrieved(retrieved, owner)
        loop = self._loop_now()
        wait = self.retrieve_futures_poll_s if timeout is None else min(max(timeout, 0.0), self.retrieve_futures_poll_s)
        deadline = loop.time() + wait
        key = (sampling_session_id, clone_id)
        while True:
            event = self._sampler_waiters.setdefault(key, asyncio.Event())
            rows = self._store.completions(sampling_session_id, clone_id, prev_cursor)
            remaining = deadline - loop.time()
            if rows or remaining <= 0:
                break
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        completions = [
            {"state": "finished", "request_id": r.request_id, "response_payload_uncompressed_size": r.result_size}
            if r.status == "done" else {"state": "failed", "request_id": r.request_id}
            for r in rows
        ]
        return {"completions": completions, "cursor": max([prev_cursor, *(r.cursor or 0 for r in rows)])}

    def _loop_now(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop


def server_error_message(exc: BaseException) -> str:
    """What a client learns of a server-side failure: the exception type (its text may name server paths)."""
    return f"internal error ({type(exc).__name__}); see the server log"


def _json_reply(obj: dict[str, Any], status: int = 200) -> Reply:
    return Reply(status, wire.JSON_CONTENT_TYPE, wire.json_bytes(obj))
