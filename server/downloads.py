"""Signed download URLs for checkpoint files, and the routes that serve them.

The SDK downloads with plain HTTP GETs that carry no API key (`tinker checkpoint download` uses urllib on the URLs
that `external_weights_urls` returned), so a URL is its own credential: an HMAC-SHA256, under the server's secret
(`ServerSettings.url_key_path`), of what it grants (one file of one checkpoint, or its archive) and until when.
Signing happens only on the authenticated routes, after the caller was shown to be allowed to read the checkpoint;
the download routes check the signature and the expiry (403 otherwise) and serve only files the engine lists for
that checkpoint (`EngineAPI.checkpoint_file`: never a path built from the URL), with Content-Length and byte ranges.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from server.errors import ApiError
from tinker_jax.engine.registry import TinkerPath
from tinker_jax.errors import NotFound

ARCHIVE = "archive.tar"  # the file name that stands for a checkpoint's archive in a signature

router = APIRouter()


def load_key(path: Path) -> bytes:
    """The signing secret at `path`, made on first use (32 random bytes, owner-only)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key
    except FileExistsError:  # pragma: no cover - another process made it between the read and the create
        return path.read_bytes()


class Signer:
    def __init__(self, key: bytes, ttl_s: int):
        self.key, self.ttl_s = key, int(ttl_s)

    def _mac(self, path: str, file: str, expires: int) -> str:
        return hmac.new(self.key, f"{path}\n{file}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, base: str, path: str, file: str, now: float | None = None) -> tuple[str, int]:
        """(absolute URL, expiry as unix seconds) granting `file` of checkpoint `path` (ARCHIVE: its archive)."""
        expires = int(now if now is not None else time.time()) + self.ttl_s
        p = TinkerPath.parse(path)
        route = "archives" if file == ARCHIVE else "downloads"
        tail = "" if file == ARCHIVE else "/" + quote(file)
        return (f"{base.rstrip('/')}/api/v1/{route}/{p.run_id}/{p.kind}/{p.name}{tail}"
                f"?expires={expires}&signature={self._mac(path, file, expires)}", expires)

    def trace_url(self, base: str, session_id: str) -> str:
        """A URL granting the session's trace (`session_trace`)."""
        expires = int(time.time()) + self.ttl_s
        return (f"{base.rstrip('/')}/api/v1/traces/{quote(session_id)}?expires={expires}"
                f"&signature={self._mac('session', session_id, expires)}")

    def check(self, path: str, file: str, expires: str | None, signature: str | None) -> None:
        """ApiError 403 unless the signature is this server's for exactly (path, file, expires) and not expired."""
        if not expires or not signature or not expires.isdigit() or not signature.isascii():
            raise ApiError(403, "download URL: missing or malformed signature")
        if not hmac.compare_digest(self._mac(path, file, int(expires)).encode(), signature.encode()):
            raise ApiError(403, "download URL: bad signature")
        if int(expires) < time.time():
            raise ApiError(403, "download URL: expired; ask for a new one")


def _signer(request: Request) -> Signer:
    return request.app.state.signer


def _path(run_id: str, kind: str, name: str) -> str:
    try:
        return str(TinkerPath.parse(f"tinker://{run_id}/{kind}/{name}", "checkpoint"))
    except Exception:  # noqa: BLE001 - a URL this server never signed
        raise ApiError(403, "download URL: bad signature") from None


@router.get("/downloads/{run_id}/{kind}/{name}/{file:path}")
def download_file(run_id: str, kind: str, name: str, file: str, request: Request, expires: str | None = None,
                  signature: str | None = None) -> FileResponse:
    path = _path(run_id, kind, name)
    _signer(request).check(path, file, expires, signature)
    try:
        where = request.app.state.engine.checkpoint_file(path, file)
    except NotFound:
        raise ApiError(404, f"checkpoint {path} has no file {file!r} (deleted since the URL was signed?)") from None
    return FileResponse(where, filename=Path(file).name, media_type="application/octet-stream")


@router.get("/archives/{run_id}/{kind}/{name}")
def download_archive(run_id: str, kind: str, name: str, request: Request, expires: str | None = None,
                     signature: str | None = None) -> FileResponse:
    path = _path(run_id, kind, name)
    _signer(request).check(path, ARCHIVE, expires, signature)
    try:
        where = request.app.state.engine.checkpoint_archive(path)
    except NotFound:
        raise ApiError(404, f"checkpoint {path} not found (deleted since the URL was signed?)") from None
    return FileResponse(where, filename=f"{run_id}-{kind}-{name}.tar", media_type="application/x-tar")


def session_trace(rows: list[dict], session_id: str) -> dict:
    """A session's requests as a trace in the Trace Event Format (JSON), which ui.perfetto.dev opens: one slice per
    request from submission to completion, one track per model or sampler (microseconds from the first)."""
    t0 = min((r["created"] for r in rows), default=0.0)
    lanes: dict[str, int] = {}
    events = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": f"session {session_id}"}}]
    for r in rows:
        lane = r.get("model_id") or r.get("sampling_session_id") or "session"
        if lane not in lanes:
            lanes[lane] = len(lanes) + 1
            events.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": lanes[lane], "args": {"name": lane}})
        end = r["finished"] if r["finished"] is not None else r["created"]
        events.append({"name": r["kind"], "ph": "X", "pid": 1, "tid": lanes[lane],
                       "ts": round((r["created"] - t0) * 1e6), "dur": max(1, round((end - r["created"]) * 1e6)),
                       "args": {"status": r["status"]}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


@router.get("/traces/{session_id}")
def download_trace(session_id: str, request: Request, expires: str | None = None,
                   signature: str | None = None) -> JSONResponse:
    signer: Signer = _signer(request)
    signer.check("session", session_id, expires, signature)
    rows = request.app.state.store.requests_of_session(session_id)
    return JSONResponse(session_trace(rows, session_id),
                        headers={"Content-Disposition": f'attachment; filename="{session_id}.trace.json"'})
