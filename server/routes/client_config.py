"""POST /client/config (mandatory for SDK >= 0.18: a 404 makes ServiceClient fail) and /client/dynamic_config."""

from typing import Annotated

from fastapi import APIRouter, Header, Request

from server.deps import OwnerDep, SettingsDep
from server.errors import ApiError
from server.tokens import looks_like_jwt
from server.settings import ServerSettings

router = APIRouter()


def feature_flags(settings: ServerSettings) -> dict[str, bool]:
    """Only flags whose server side exists are turned on, so a client never takes a path this server lacks."""
    flags = {
        "pjwt_auth_enabled": settings.jwt_auth,
        "proto_compress_fwdbwd": settings.proto_compress_fwdbwd,
        "sample_use_retrieve_futures": settings.sample_use_retrieve_futures,
        "sample_join_sampling_session": settings.sample_join_sampling_session,
        "custom_loss_server_side": False,
    }
    if settings.use_pyqwest_transport is not None:
        flags["use_pyqwest_transport"] = settings.use_pyqwest_transport
    return flags


@router.post("/client/config")
async def client_config(settings: SettingsDep) -> dict[str, bool]:
    return feature_flags(settings)


@router.post("/auth/token")
async def auth_token(request: Request, owner: OwnerDep, settings: SettingsDep,
                     x_api_key: Annotated[str | None, Header()] = None) -> dict[str, str]:
    """JWT mode: a short-lived token for the caller's key (server.tokens); `whoami` reads its claims. Only a key
    buys one (the SDK exchanges its root credential): a token cannot renew itself, so its expiry holds."""
    if not settings.jwt_auth:
        raise ApiError(404, "JWT mode is off on this server (jwt_auth: false); send the API key itself")
    if x_api_key and looks_like_jwt(x_api_key):
        raise ApiError(401, "a token cannot be exchanged for another; present the API key")
    return {"jwt": request.app.state.tokens.issue(owner)}


@router.post("/client/dynamic_config")
async def client_dynamic_config(settings: SettingsDep) -> dict[str, object]:
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": settings.sample_cancel_enabled,
            "sample_cancel_max_batch_size": 64}
