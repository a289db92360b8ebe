"""GET /healthz: working, not merely alive. Mounted without the API-key check, so probes need no credential (wire
doc §7); for the same reason problems name components and error types, never paths or ids.

200 `{"status": "ok"}` (the SDK's HealthResponse needs that literal) when
- the server database answers a trivial query over each of its tables (and, after a request failed on a database
  error, a full `PRAGMA quick_check`, until one passes);
- the engine says it is healthy (`EngineAPI.health()`: its registry answers, no worker has died);
- the background tasks' last runs succeeded (`HealthState`, which they report to).
Otherwise 503 `{"status": "unhealthy", "problems": [...], "error": "...", "category": "server"}`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.errors import private_paths, redact

router = APIRouter()

CHECK_TIMEOUT_S = 5.0  # a probe must answer; a database locked this long is a problem worth reporting


def describe(exc: BaseException) -> str:
    """An exception for /healthz and the once-per-failure log line: SQLite's own messages (which name no paths),
    otherwise only the type."""
    if isinstance(exc, sqlite3.Error) and str(exc):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


class HealthState:
    """What the background tasks report, and whether the server database needs a full check."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._problems: dict[str, str] = {}
        self.store_suspect = False

    def failed(self, task: str, exc: BaseException) -> bool:
        """Record a failure of `task`; True when it differs from the task's previous one (log it then, once)."""
        desc = describe(exc)
        if isinstance(exc, sqlite3.DatabaseError):
            self.store_suspect = True
        with self._lock:
            new = self._problems.get(task) != desc
            self._problems[task] = desc
        return new

    def succeeded(self, task: str) -> bool:
        """Clear `task`'s failure; True when it had one (log the recovery)."""
        with self._lock:
            return self._problems.pop(task, None) is not None

    def problems(self) -> list[str]:
        with self._lock:
            return [f"{task}: {desc}" for task, desc in self._problems.items()]


def _check_store(store: Any, health: HealthState) -> None:
    store.ping()
    if health.store_suspect:
        result = store.quick_check()
        if result != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {result}")
        health.store_suspect = False


async def _within(fn, *args) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), CHECK_TIMEOUT_S)


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    state = request.app.state
    problems: list[str] = []
    try:
        await _within(_check_store, state.store, state.health)
    except asyncio.TimeoutError:
        problems.append(f"server database: no answer within {CHECK_TIMEOUT_S:g} s")
    except Exception as e:  # noqa: BLE001 - reported, not raised
        problems.append(f"server database: {describe(e)}")
    try:
        engine = await _within(state.engine.health)
        if not engine.get("ok"):
            problems += [f"engine: {p}" for p in engine.get("problems") or ["not ok"]]
    except asyncio.TimeoutError:
        problems.append(f"engine: no answer within {CHECK_TIMEOUT_S:g} s")
    except Exception as e:  # noqa: BLE001
        problems.append(f"engine: health check failed ({describe(e)})")
    problems += state.health.problems()
    # Unauthenticated: whatever an engine or SQLite message says, the data directory's path is not for a probe.
    problems = [redact(p, private_paths(state.settings.data_dir)) for p in problems]
    if problems:
        return JSONResponse({"status": "unhealthy", "problems": problems, "error": "; ".join(problems),
                             "category": "server"}, status_code=503)
    return JSONResponse({"status": "ok"})  # HealthResponse requires the literal "ok"
