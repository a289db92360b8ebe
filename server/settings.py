"""Server settings: one frozen dataclass, every knob with a one-line reason."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tinker_jax.config import default_data_dir

log = logging.getLogger(__name__)

# The SDK itself refuses to send keys without this prefix (or a JWT, which we do not issue), so a configured key
# without it could never authenticate anybody.
API_KEY_PREFIX = "tml-"


def api_keys(api_key: str | None = None) -> tuple[str, ...]:
    """The accepted keys: `api_key` (the --api-key flag) first, then $TINKER_JAX_API_KEYS (comma separated)."""
    keys = [api_key] if api_key else []
    keys += [k.strip() for k in os.environ.get("TINKER_JAX_API_KEYS", "").split(",") if k.strip()]
    return tuple(dict.fromkeys(keys))


@dataclass(frozen=True)
class ServerSettings:
    data_dir: Path
    """Where server.sqlite3 (sessions, futures, idempotency keys) lives; the engine keeps its own files beside it."""

    api_keys: tuple[str, ...] = ()
    """Accepted X-API-Key values. Empty means any key is accepted (local development only)."""

    long_poll_s: float = 25.0
    """How long retrieve_future holds a pending request before answering try_again; must stay under the
    SDK's 45 s read timeout or the client backs off exponentially (wire doc §3.4)."""

    retrieve_futures_poll_s: float = 25.0
    """Default long-poll for retrieve_futures when the request carries no timeout (same 45 s client limit)."""

    max_body_bytes: int = 1 << 30
    """Cap on a data-bearing request body (forward_backward, forward, asample) after zstd decompression: they are
    bounded by tokens in the engine, so this only stops absurd uploads (SkyRL caps at 1 GiB too)."""

    max_json_body_bytes: int = 4 << 20
    """Cap on every other request body (JSON control requests: sessions, saves, loads, REST): the largest the SDK
    sends is a few KB, so a few MiB is generous and keeps one client from making the server parse 1 GiB of JSON."""

    max_metadata_bytes: int = 8192
    """Cap on each free-form field that is stored (tags, user_metadata, display names, finish details), measured as
    JSON: they are labels, and each is written to SQLite on every session, model and checkpoint."""

    max_sessions_per_key: int = 64
    """Open (unfinished) sessions one API key may hold: each holds heartbeats, sampler snapshots and models; a client
    that vanishes frees its sessions after session_timeout_s."""

    max_models_per_key: int = 32
    """Training models one API key may hold in its open sessions: each takes device memory (an adapter slot and its
    optimizer state, or a full copy of the weights) until its session finishes or expires."""

    max_queued_per_key: int = 2048
    """Unfinished requests (training, sampling, saves) one API key may have at once, over all its sessions; beyond
    it a submit gets HTTP 429 and the SDK retries it with backoff. Each session also has the engine's own bound
    (max_queued_per_tenant), and the whole engine max_queued: this one keeps one key from taking all of that."""

    body_read_timeout_s: float = 60.0
    """Longest a client may take to send a request body (then 408): a client that sends half a body must not hold a
    connection and its buffer forever. 60 s is the SDK's own request timeout."""

    future_ttl_s: float = 3600.0
    """Finished futures (and their result payloads) are deleted this long after they finish."""

    retrieved_ttl_s: float = 600.0
    """...or this long after they were first fetched in full, whichever comes first: clients re-poll a finished
    future only after a lost response, which happens within seconds."""

    prune_interval_s: float = 60.0
    """How often the background task deletes expired futures and checkpoints past their TTL."""

    session_timeout_s: float = 300.0
    """A session with no heartbeat for this long is expired and its models and samplers are released (the SDK
    beats every 10 s from every process holding a client, so this is many missed beats; SkyRL uses 300 s)."""

    session_check_interval_s: float = 30.0
    """How often the background task looks for expired sessions."""

    max_samplers_per_session: int = 32
    """Sampler weight snapshots kept in memory per session, least recently used evicted first: an RL loop makes a
    new sampler every step and never says when it drops the old one. Path-backed samplers reload transparently."""

    # --- client/config feature flags: advertise only what the server implements -------------------------------
    proto_compress_fwdbwd: bool = True
    """The zstd request middleware is always on, so clients may compress fwd/bwd bodies (>10x smaller)."""

    sample_use_retrieve_futures: bool = False
    """Session-level completion polling (/retrieve_futures). asample registers its futures with
    sampling_session_id and seq_id, so this works; it stays off by default because per-request long-polls are
    what every SDK version supports and one fewer moving part."""

    sample_join_sampling_session: bool = True
    """Unpickled SamplingClients ask /join_sampling_session for a clone id instead of drawing a random one."""

    sample_cancel_enabled: bool = True
    """client/dynamic_config: the SDK calls /cancel_future for abandoned samples, so queued work is dropped."""

    use_pyqwest_transport: bool | None = None
    """None leaves the SDK's default transport; False forces plain httpx on the client."""

    jwt_auth: bool = True
    """The SDK's JWT mode (client/config `pjwt_auth_enabled`): clients exchange their key for a short-lived token
    (POST /auth/token) and send that; `whoami` and `tinker auth whoami` need it. Keys stay the root credential."""

    jwt_ttl_s: int = 3600
    """Lifetime of those tokens (the SDK refreshes at half of it)."""

    download_url_ttl_s: int = 3600
    """How long a signed download URL (external_weights_urls, archive) stays valid. The SDK's CLI signs again
    when fewer than 5 minutes are left."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        for key in self.api_keys:
            if not key.startswith(API_KEY_PREFIX) or len(key) <= len(API_KEY_PREFIX):
                raise ValueError(
                    f"api key {key[:4]!r}... must start with {API_KEY_PREFIX!r} and have a body: "
                    "the tinker SDK refuses to send any other key"
                )
        if not 0 < self.long_poll_s < 45 or not 0 < self.retrieve_futures_poll_s < 45:
            raise ValueError("long-poll times must be in (0, 45) s: the SDK's read timeout is 45 s")
        if self.session_timeout_s <= 0 or self.session_check_interval_s <= 0:
            raise ValueError("session_timeout_s and session_check_interval_s must be positive")
        for name in ("max_body_bytes", "max_json_body_bytes", "max_metadata_bytes", "max_sessions_per_key",
                     "max_models_per_key", "max_queued_per_key", "body_read_timeout_s", "download_url_ttl_s",
                     "jwt_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    @property
    def open_access(self) -> bool:
        """No API keys configured: a single-user local server, where runs without a recorded owner (made by the
        in-process client over the same data directory) are everyone's. With keys, nothing ownerless is visible."""
        return not self.api_keys

    @property
    def db_path(self) -> Path:
        return self.data_dir / "server.sqlite3"

    @property
    def url_key_path(self) -> Path:
        """The secret that signs download URLs and (through a derived key) JWT-mode tokens: made (random, mode 0600)
        on first use, read at startup and kept across restarts, so what was handed out stays valid until it
        expires; delete it and restart the server to revoke every URL and token at once."""
        return self.data_dir / "download-url.key"

    @classmethod
    def from_env(cls, data_dir: Path | str | None = None, **overrides) -> ServerSettings:
        """TINKER_JAX_DATA_DIR (via tinker_jax.config.default_data_dir), TINKER_JAX_API_KEYS (comma separated) and
        TINKER_JAX_SESSION_TIMEOUT_S; keyword overrides win."""
        keys = api_keys()
        data_dir = data_dir or default_data_dir()
        if os.environ.get("TINKER_JAX_SESSION_TIMEOUT_S") and "session_timeout_s" not in overrides:
            overrides["session_timeout_s"] = float(os.environ["TINKER_JAX_SESSION_TIMEOUT_S"])
        settings = cls(data_dir=Path(data_dir), api_keys=overrides.pop("api_keys", keys), **overrides)
        if not settings.api_keys:
            log.warning("no API keys configured: every X-API-Key is accepted (set TINKER_JAX_API_KEYS)")
        return settings

