"""GET /healthz: liveness. Mounted without the API-key check so probes need no credential (wire doc §7)."""

from fastapi import APIRouter

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}  # HealthResponse requires the literal "ok"
