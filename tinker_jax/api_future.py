"""The in-process clients' futures (`ServiceClient`, `RestClient`): the SDK's `tinker.APIFuture` over a
concurrent.futures.Future, the already-finished future a client is of its own creation, and retrying a submit
while the engine's queues are full."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time
from typing import Any, Callable, TypeVar

import tinker

from tinker_jax.errors import Overloaded
from tinker_jax.futures import then

T = TypeVar("T")


class APIFuture(tinker.APIFuture[T]):
    """A result computed in the background, as the SDK's `tinker.APIFuture` (an instance of it): `.result(timeout)`,
    `await fut`, `await fut.result_async(timeout)`, `.future()` (a concurrent.futures.Future), `.coroutine()`,
    `.done()`."""

    def __init__(self, fut: cf.Future, post: Callable[[Any], T] | None = None):
        self._fut = fut if post is None else then(fut, post)

    def result(self, timeout: float | None = None) -> T:
        return self._fut.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        # As the SDK's: a timeout, or the awaiting task's cancellation, cancels the operation if it has not started
        async with asyncio.timeout(timeout):
            return await asyncio.wrap_future(self._fut)

    def future(self) -> cf.Future:
        return self._fut

    def done(self) -> bool:
        return self._fut.done()


class ClientFuture:
    """A client is also the (already finished) future of its creation, as the SDK's `create_*` calls return one:
    `.result()`, `await`, `result_async()`."""

    def result(self, timeout: float | None = None):
        return self

    async def result_async(self, timeout: float | None = None):
        return self

    def __await__(self):
        return self.result_async().__await__()


def done_future(value) -> APIFuture:
    f: cf.Future = cf.Future()
    f.set_result(value)
    return APIFuture(f)


def retrying(call: Callable[[], T]) -> T:
    """Submit, backing off while the engine's queues are full (what the SDK does on HTTP 429)."""
    delay = 0.01
    while True:
        try:
            return call()
        except Overloaded as e:
            time.sleep(min(delay, e.retry_after_s))
            delay = min(2 * delay, 1.0)
