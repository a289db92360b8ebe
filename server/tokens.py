"""Short-lived tokens for the SDK's JWT mode (`pjwt_auth_enabled`): the SDK exchanges its API key for a JWT at
POST /auth/token, sends the JWT as X-API-Key on every request, refreshes it at half its lifetime, and reads its
claims for `whoami` (`sub`, `org_id`, `email`; it never checks the signature, this server does).

API keys stay the root credential: a token names the key it was made from (its owner tag, as `tag`) and is accepted
only while that key is configured, so removing a key revokes its tokens at once. HS256 under a key derived from
the server's secret file (`ServerSettings.url_key_path`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

ISSUER = "tinker-jax"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def looks_like_jwt(value: str) -> bool:
    return value.startswith("eyJ") and value.count(".") == 2


class Tokens:
    def __init__(self, secret: bytes, ttl_s: int):
        self.key = hmac.new(secret, b"tinker-jax jwt", hashlib.sha256).digest()  # not the download URLs' key
        self.ttl_s = int(ttl_s)

    def _sign(self, head_body: str) -> str:
        return _b64(hmac.new(self.key, head_body.encode(), hashlib.sha256).digest())

    def issue(self, tag: str, now: float | None = None) -> str:
        now = int(now if now is not None else time.time())
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
        claims = {"iss": ISSUER, "sub": f"tml:user:{tag}", "org_id": "local", "email": "", "tag": tag,
                  "iat": now, "exp": now + self.ttl_s}
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{header}.{body}.{self._sign(f'{header}.{body}')}"

    def verify(self, token: str) -> str | None:
        """The owner tag a valid, unexpired token of this server names; None otherwise."""
        try:
            header, body, sig = token.split(".")
            if not hmac.compare_digest(self._sign(f"{header}.{body}"), sig):
                return None
            claims = json.loads(_unb64(body))
        except (ValueError, TypeError):
            return None
        if claims.get("iss") != ISSUER or not isinstance(claims.get("tag"), str):
            return None
        if not isinstance(claims.get("exp"), (int, float)) or claims["exp"] < time.time():
            return None
        return claims["tag"]
