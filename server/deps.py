"""FastAPI dependencies: the app's shared objects, the API-key check, and the JSON body.

Use the `Annotated` aliases in route signatures, e.g. `async def route(body: JsonBody, store: StoreDep)`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from server import wire
from server.access import Caller
from server.errors import ApiError
from server.futures import FutureRegistry
from server.samplers import EngineSamplers
from server.settings import ServerSettings
from server.store import Store
from server.tokens import looks_like_jwt
from tinker_jax.engine.api import EngineAPI


def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def get_engine(request: Request) -> EngineAPI:
    return request.app.state.engine


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_futures(request: Request) -> FutureRegistry:
    return request.app.state.futures


def get_samplers(request: Request) -> EngineSamplers:
    return request.app.state.samplers


def key_tag(api_key: str | None) -> str:
    """What the store keeps as a session's owner: a digest, so the database never holds a usable key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else "anonymous"


async def require_api_key(request: Request, x_api_key: Annotated[str | None, Header()] = None) -> str:
    """X-API-Key is the SDK's only auth header (§7): an API key, or in JWT mode a token this server issued for one
    (server.tokens) while that key is still configured. With keys configured, anything else is a 401 with a JSON
    body (the SDK does not retry 401; for a token it fetches a new one, told so by WWW-Authenticate). Returns the
    caller's owner tag, the same for a key and its tokens."""
    settings = get_settings(request)
    keys = settings.api_keys
    if x_api_key and settings.jwt_auth and looks_like_jwt(x_api_key):
        tag = request.app.state.tokens.verify(x_api_key)
        if tag is None or (keys and tag not in {key_tag(k) for k in keys}):
            raise ApiError(401, "invalid or expired token", headers={
                "WWW-Authenticate": 'Bearer error="invalid_token"'})
        return tag
    if keys and not (x_api_key and any(hmac.compare_digest(x_api_key.encode(), k.encode()) for k in keys)):
        raise ApiError(401, "missing or invalid X-API-Key")
    return key_tag(x_api_key)


async def caller(request: Request, owner: Annotated[str, Depends(require_api_key)]) -> Caller:
    """The caller as `server.access` needs it for runs and checkpoints (FastAPI runs the key check once)."""
    return Caller(owner, sees_unowned=get_settings(request).open_access)


async def json_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (already size-capped, read, decompressed and content-type checked by
    `server.middleware`); malformed -> 400."""
    return wire.parse_json_object(await request.body())


SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
EngineDep = Annotated[EngineAPI, Depends(get_engine)]
StoreDep = Annotated[Store, Depends(get_store)]
FuturesDep = Annotated[FutureRegistry, Depends(get_futures)]
SamplersDep = Annotated[EngineSamplers, Depends(get_samplers)]
OwnerDep = Annotated[str, Depends(require_api_key)]
CallerDep = Annotated[Caller, Depends(caller)]
JsonBody = Annotated[dict[str, Any], Depends(json_body)]
