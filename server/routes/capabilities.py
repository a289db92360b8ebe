"""GET /get_server_capabilities: the models the engine serves."""

from typing import Any

from fastapi import APIRouter

from server.deps import EngineDep

router = APIRouter()


def supported_models(capabilities: list[Any]) -> list[dict[str, Any]]:
    """engine.capabilities() items -> SupportedModel JSON. A bare name means trainable and sampleable; a dict (or
    pydantic model) may add max_context_length or turn either off."""
    out = []
    for cap in capabilities:
        if isinstance(cap, str):
            out.append({"model_name": cap, "trainable": True, "sampleable": True})
        elif isinstance(cap, dict):
            out.append({k: v for k, v in cap.items() if v is not None})
        else:
            out.append(cap.model_dump(mode="json", exclude_none=True))
    return out


@router.get("/get_server_capabilities")
def get_server_capabilities(engine: EngineDep) -> dict[str, Any]:
    # A plain `def` runs in FastAPI's thread pool, so a slow engine call cannot stall the event loop.
    return {"supported_models": supported_models(list(engine.capabilities()))}
