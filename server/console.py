"""The web console: one page (`/`, `/console`) that shows a key's sessions, training runs with their metrics plotted
over steps, checkpoints with download links, the engine's queues and samplers, and the server's health and devices.

The page is static (server/static: HTML, a small script, uPlot vendored as a file: no build step, nothing fetched
from the internet) and polls `GET /api/v1/console/state` once a second. That route is behind the API-key check like
every other: with keys configured the page asks for one (kept in the browser's localStorage, or given in the URL
fragment `#key=...`, which browsers never send to the server) and shows only what that key owns; without a key it
shows nothing. Download links are signed URLs (server.downloads), made per poll.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse

from server.access import sees
from server.deps import CallerDep, EngineDep, SettingsDep, StoreDep
from server.downloads import ARCHIVE
from server.errors import ApiError
from tinker_jax.engine.registry import KINDS
from tinker_jax.errors import NotFound

STATIC = Path(__file__).parent / "static"
FILES = {"console.html": "text/html", "console.js": "text/javascript", "console.css": "text/css",
         "uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css"}
MAX_RUNS = 50  # runs (newest first) the state carries, with their metrics

public = APIRouter()  # the page and its files: no data in them
router = APIRouter()  # the data: behind the API key


@public.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/console", status_code=307)


@public.get("/console", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "console.html", media_type="text/html")


@public.get("/console/static/{name}", include_in_schema=False)
def static(name: str) -> FileResponse:
    if name not in FILES:  # a fixed list: no name from the URL reaches the filesystem
        raise ApiError(404, f"no console file {name!r}")
    return FileResponse(STATIC / name, media_type=FILES[name])


def _metric_series(rows: list[tuple[str, int, float, dict]]) -> dict[str, list[list[float]]]:
    """Per metric name, [[step, value], ...] with one point per step: a step's several forward_backward calls
    (gradient accumulation) add up their ":sum" metrics and average the others."""
    acc: dict[str, dict[int, list[float]]] = {}
    for kind, step, _, metrics in rows:
        for name, value in metrics.items():
            acc.setdefault(name, {}).setdefault(step, []).append(value)
    return {name: [[s, sum(v) if name.endswith(":sum") else sum(v) / len(v)] for s, v in sorted(by_step.items())]
            for name, by_step in sorted(acc.items())}


def _downloads(request: Request, path: str, kind: str, engine) -> list[dict[str, str]]:
    signer, base = request.app.state.signer, str(request.base_url)
    if kind != "external_weights":
        return [{"name": "archive (.tar)", "url": signer.url(base, path, ARCHIVE)[0]}]
    try:
        names = engine.checkpoint_files(path)
    except NotFound:
        return []
    return [{"name": n, "url": signer.url(base, path, n)[0]} for n in names]


@router.get("/console/state")
def state(request: Request, engine: EngineDep, store: StoreDep, caller: CallerDep,
          settings: SettingsDep) -> dict[str, Any]:
    now = time.time()
    # The REST routes' scoping (access.sees): the caller's key's runs, and ownerless ones only without API keys.
    runs = [r for r in engine.list_runs() if sees(r, caller)][:MAX_RUNS]  # newest first
    run_ids = {r.run_id for r in runs}
    ckpts = [c for c in engine.list_checkpoints() if c.run_id in run_ids and (c.expires is None or c.expires > now)]
    stats = engine.stats()
    sessions = store.sessions_of(caller.owner, limit=50)
    cache = stats.get("compile_cache") or {}
    return {
        "time": now,
        "keys_required": not settings.open_access,
        "health": engine.health(),
        "devices": stats.get("devices", []),
        "compile_cache": {"on": bool(cache.get("dir")), "files": cache.get("files"), "bytes": cache.get("bytes")},
        "key_given": bool(request.headers.get("x-api-key")),
        "programs_compiled": stats.get("programs_compiled"),
        "models": {name: {"loaded": m.get("loaded"), "queued": m.get("queued"), "attention": m.get("attention"),
                          "inflight": stats.get("inflight", {}).get(name, 0),
                          "lora_slots_in_use": m.get("lora_slots_in_use"), "sampler": m.get("sampler")}
                   for name, m in stats.get("models", {}).items()},
        "sessions": [{"id": s.session_id, "created": s.created, "last_heartbeat": s.last_heartbeat,
                      "finished": s.finished, "sdk_version": s.sdk_version, "tags": s.tags,
                      "models": store.models_of_session(s.session_id)} for s in sessions],
        "runs": [{"id": r.run_id, "base_model": r.base_model, "lora_rank": r.lora_rank, "owner": r.owner,
                  "created": r.created, "last_request": r.last_request,
                  "metrics": _metric_series(store.metrics_of(r.run_id))} for r in runs],
        "checkpoints": [{"path": c.path, "run_id": c.run_id, "type": KINDS[c.kind], "name": c.name,
                         "size_bytes": c.size_bytes, "created": c.created, "expires": c.expires,
                         "public": c.public, "step": c.step,
                         "downloads": _downloads(request, c.path, c.kind, engine)} for c in ckpts],
    }
