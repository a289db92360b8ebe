"""Request bodies, before routing and before any route runs: size caps, a read timeout, Content-Type and
Content-Encoding, and decompression, as one pure ASGI middleware. Routes see a complete, decompressed body.

- Size (413): the data-bearing routes (forward_backward, forward, asample; bounded by tokens in the engine) may send
  up to `max_body_bytes`; every other route (JSON control requests) `max_json_body_bytes`. Checked against
  Content-Length before reading, while reading, and after zstd decompression.
- Read time (408): the whole body must arrive within `body_read_timeout_s`, so a client that sends half a body
  cannot hold a connection and its buffer forever. The connection is closed after any refusal.
- Content-Type (415): a request with a body must say what it is, as the SDK does (wire doc §1.3):
  `application/json` (or any `+json` type) on every route, and `application/x-protobuf` on forward_backward (and the
  legacy forward, whose decoder takes both). A body *without* a Content-Type is refused too: the SDK always sends
  one, and a web page can send an untyped or `text/plain` body to a server on localhost without a CORS preflight.
  Requests without a body (GET, DELETE, an empty POST) are not checked. A request with Transfer-Encoding has a
  body; one that also carries Content-Length is refused (400), since the parser would believe the former.
- Content-Encoding: `zstd` (the SDK compresses forward_backward bodies once client/config says
  `proto_compress_fwdbwd`) or identity; anything else is a 415. ASGI servers do not undo Content-Encoding on
  requests (wire doc §2.4).
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterable

from server import wire
from server.errors import error_body
from tinker_jax.errors import UserError

_IDENTITY = {b"", b"identity"}
_ZSTD = b"zstd"


class RequestBodyMiddleware:
    def __init__(self, app: Any, *, max_json_bytes: int, max_data_bytes: int, read_timeout_s: float,
                 data_paths: Iterable[str] = (), proto_paths: Iterable[str] = ()):
        self.app = app
        self.max_json_bytes, self.max_data_bytes = max_json_bytes, max_data_bytes
        self.read_timeout_s = read_timeout_s
        self.data_paths, self.proto_paths = tuple(data_paths), tuple(proto_paths)

    def _limit(self, path: str) -> tuple[int, str]:
        if path.endswith(self.data_paths):
            return self.max_data_bytes, "max_body_bytes"
        return self.max_json_bytes, "max_json_body_bytes"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        path = scope.get("path", "")
        limit, knob = self._limit(path)
        too_big = f"request body exceeds this server's limit of {limit} bytes for {path} ({knob})"

        declared = _header(headers, b"content-length")
        chunked = _header(headers, b"transfer-encoding") is not None
        if declared is not None and chunked:
            # The HTTP parser reads the body by Transfer-Encoding and ignores Content-Length: believing a
            # `Content-Length: 0` beside it would skip every check below. A request smuggling shape; no client needs it.
            return await _reject(send, 400, "Content-Length and Transfer-Encoding: send one, not both")
        if declared is not None:
            try:
                length = int(declared)
                if length < 0:
                    raise ValueError
            except ValueError:
                return await _reject(send, 400, "Content-Length: not a non-negative integer")
            if length > limit:
                return await _reject(send, 413, too_big)
            has_body = length > 0
        else:
            has_body = chunked
        if not has_body:
            return await self.app(scope, receive, send)

        problem = self._content_type_problem(_header(headers, b"content-type"), path)
        if problem is not None:
            return await _reject(send, 415, problem)
        encoding = (_header(headers, b"content-encoding") or b"").strip().lower()
        if encoding not in _IDENTITY and encoding != _ZSTD:
            return await _reject(send, 415, f"Content-Encoding: {encoding.decode('latin-1')!r} is not supported "
                                            "(only zstd)")

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                return await _reject(send, 408, f"request body: not received in full within {self.read_timeout_s:g} s "
                                                "(body_read_timeout_s)")
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _reject(send, 413, too_big)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if encoding == _ZSTD:
            try:
                body = wire.decompress(body, "zstd", limit)
            except UserError as e:
                status = 413 if "exceeds" in str(e) else 400
                return await _reject(send, status, too_big if status == 413 else str(e))

        scope = dict(scope, headers=[(k, v) for k, v in headers
                                     if k not in (b"content-encoding", b"content-length", b"transfer-encoding")]
                     + [(b"content-length", str(len(body)).encode())])
        delivered = False

        async def receive_body() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as with a normal body

        await self.app(scope, receive_body, send)

    def _content_type_problem(self, content_type: bytes | None, path: str) -> str | None:
        proto_ok = path.endswith(self.proto_paths)
        expected = f"application/json{' or ' + wire.PROTO_CONTENT_TYPE if proto_ok else ''}"
        if content_type is None:
            return f"Content-Type: missing; this route expects {expected}"
        media = content_type.decode("latin-1").split(";")[0].strip().lower()
        if media == "application/json" or media.endswith("+json"):
            return None
        if proto_ok and media == wire.PROTO_CONTENT_TYPE:
            return None
        return f"Content-Type: expected {expected}, got {media!r}"


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((v for k, v in headers if k == name), None)


async def _reject(send: Any, status: int, message: str) -> None:
    """Answer with the error body and close the connection: any unread rest of the body is not worth reading."""
    body = wire.json_bytes(error_body(message))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
