"""POST /telemetry: SDK telemetry batches, accepted and dropped (a 5xx here would be retried 10 times, §11)."""

import logging

from fastapi import APIRouter

from server.deps import JsonBody

router = APIRouter()
log = logging.getLogger(__name__)


@router.post("/telemetry")
async def telemetry(body: JsonBody) -> dict[str, str]:
    events = body.get("events")
    log.debug("telemetry: %d events from session %s", len(events) if isinstance(events, list) else 0,
              body.get("session_id"))
    return {"status": "accepted"}
