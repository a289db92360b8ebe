"""What went wrong, by whose fault. Both front doors map these the same way:

- `UserError` (a ValueError): the client's mistake; the message names the field. HTTP 400, category "user".
  `NotFound` is one (an unknown model, sampler or checkpoint).
- `Overloaded`: a queue bound was reached; nothing was queued and retrying later succeeds. HTTP 429, which the
  SDK retries with backoff (the in-process client retries the same way).
- `Unavailable`: the server cannot work now (a process of a multi-host engine is gone) and its message is meant
  for the client: HTTP 503, category "server", the message kept.
- `Stopped`: the engine stopped before the request finished (a shutdown): the server records it as lost, as if
  it had restarted under it (a sample's poll then answers 410, which the SDK resubmits).
- anything else: the server's fault. Logged with its traceback, HTTP 500, category "server".
A plain ValueError is *not* a user error: code below the engine (JAX among it) raises ValueError for its own bugs.
"""

from __future__ import annotations


class UserError(ValueError):
    """The request is wrong; the message says which field and why."""


class NotFound(UserError):
    """An unknown (or not yours) model, sampler, checkpoint or base model."""


class Unavailable(RuntimeError):
    """The server cannot serve (not the client's mistake); the message says why and is shown to clients."""


class Stopped(RuntimeError):
    """The engine (or its sampler) stopped before this request finished."""


class Overloaded(Exception):
    """A bounded queue is full: retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s
