"""Request-body size cap and decompression as pure ASGI middleware.

ASGI servers do not undo `Content-Encoding` on requests (wire doc §2.4), and the SDK zstd-compresses forward_backward
bodies once client/config says `proto_compress_fwdbwd`. Doing it here, before routing, keeps every route ignorant of
compression and caps the decompressed size in one place.
"""

from __future__ import annotations

from typing import Any

from server import wire
from server.errors import error_body
from tinker_jax.errors import UserError

_IDENTITY = {b"", b"identity"}


class DecompressRequestMiddleware:
    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        encoding = next((v for k, v in headers if k == b"content-encoding"), b"").strip().lower()
        if encoding in _IDENTITY:
            declared = next((v for k, v in headers if k == b"content-length"), None)
            if declared is not None:  # the server enforces the declared length; only its size needs checking
                try:
                    too_big = int(declared) > self.max_bytes
                except ValueError:
                    return await _reject(send, 400, "Content-Length: not an integer")
                if too_big:
                    return await _reject(send, 413, f"request body exceeds the {self.max_bytes}-byte limit")
                return await self.app(scope, receive, send)
            # A chunked body without Content-Length: read it here, under the same cap.

        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _reject(send, 413, f"request body exceeds the {self.max_bytes}-byte limit")
            if not message.get("more_body", False):
                break
        try:
            body = wire.decompress(b"".join(chunks), encoding.decode("latin-1"), self.max_bytes)
        except UserError as e:
            status = 415 if "not supported" in str(e) else 413 if "exceeds" in str(e) else 400
            return await _reject(send, status, str(e))

        scope = dict(scope, headers=[(k, v) for k, v in headers if k not in (b"content-encoding", b"content-length")]
                     + [(b"content-length", str(len(body)).encode())])
        delivered = False

        async def receive_decompressed() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as with a normal body

        await self.app(scope, receive_decompressed, send)


async def _reject(send: Any, status: int, message: str) -> None:
    body = wire.json_bytes(error_body(message))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
