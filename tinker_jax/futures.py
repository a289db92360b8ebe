"""Small helpers over concurrent.futures.Future, shared by the engine and its front doors."""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable


class _Derived(concurrent.futures.Future):
    """A future computed from another: it can be cancelled only while that one can (it has not started)."""

    def __init__(self, source: concurrent.futures.Future):
        super().__init__()
        self._source = source

    def cancel(self) -> bool:
        if not self._source.cancel():  # already running or done: the work happens, say so
            return False
        return super().cancel() or self.cancelled()


def then(future: concurrent.futures.Future, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
    """A future of `fn(future.result())`; exceptions (fn's own included) pass through. `fn` runs on the thread that
    completes `future` (an engine worker's), so it must be quick and thread-safe. Cancelling the returned future
    cancels `future` (a client's cancel reaches the engine's queue through it), and succeeds only if that does."""
    out: concurrent.futures.Future = _Derived(future)

    def done(f: concurrent.futures.Future) -> None:
        if f.cancelled():
            concurrent.futures.Future.cancel(out)
            out.set_running_or_notify_cancel()
            return
        if not out.set_running_or_notify_cancel():
            return
        exc = f.exception()
        if exc is not None:
            out.set_exception(exc)
            return
        try:
            out.set_result(fn(f.result()))
        except BaseException as e:  # noqa: BLE001 - delivered through the future
            out.set_exception(e)

    future.add_done_callback(done)
    return out


def begin(future: concurrent.futures.Future) -> bool:
    """Start `future` (False: it was cancelled); one already started stays started (a second call is harmless,
    where `set_running_or_notify_cancel` would raise)."""
    return future.running() or future.set_running_or_notify_cancel()


def failed(exc: BaseException) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_exception(exc)
    return future


def resolved(value: Any) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(value)
    return future
