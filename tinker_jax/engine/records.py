"""How training runs and checkpoints read on the SDK's surface (`tinker.types.TrainingRun`, `Checkpoint`), as JSON
dicts: one conversion for the REST server's routes and the in-process `RestClient`, so both front doors describe a
run the same way. Who may see what (API keys, published checkpoints) is the server's business; here a caller
either sees a run as its own (`own=True`) or only through its published checkpoints.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, Iterable

from tinker_jax.engine.api import CheckpointInfo, EngineAPI, RunInfo
from tinker_jax.engine.registry import KINDS


def iso_time(ts: float | None) -> str | None:
    """A unix time as the SDK's datetime fields take it: ISO 8601 in UTC, to the microsecond (None stays None)."""
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


def str_dict(raw: Any) -> dict[str, str] | None:
    """user_metadata is dict[str, str] on the wire (TrainingRun / Checkpoint); stored JSON may hold anything."""
    if not isinstance(raw, dict) or not raw:
        return None
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}


def live(ckpts: Iterable[CheckpointInfo], now: float | None = None) -> list[CheckpointInfo]:
    """Those not past their TTL (an expired one is listed nowhere while its delete is queued)."""
    now = time.time() if now is None else now
    return [c for c in ckpts if c.expires is None or c.expires > now]


def checkpoint_record(c: CheckpointInfo) -> dict[str, Any]:
    return {
        "checkpoint_id": f"{c.kind}/{c.name}",
        "checkpoint_type": KINDS[c.kind],
        "time": iso_time(c.created),
        "tinker_path": c.path,
        "size_bytes": c.size_bytes,
        "public": c.public,
        "user_metadata": str_dict(c.user_metadata),
        "expires_at": iso_time(c.expires),
    }


def training_run_record(run: RunInfo, ckpts: list[CheckpointInfo], own: bool) -> dict[str, Any]:
    """`run` with its live checkpoints `ckpts` (newest first). Seen as one's own: in full. Otherwise (listed because
    it published a checkpoint) only what its published checkpoints reveal: the latest checkpoints are chosen among
    the published ones, the run's user_metadata is left out (optional on the wire), the owner tag (a required
    string) is blank, and the last request time is that of its newest published checkpoint."""
    if not own:
        ckpts = [c for c in ckpts if c.public]
    latest = {kind: next((c for c in ckpts if c.kind == kind), None) for kind in KINDS}
    last_request = (run.last_request or run.created) if own else (ckpts[0].created if ckpts else run.created)
    return {
        "training_run_id": run.run_id,
        "base_model": run.base_model,
        "model_owner": (run.owner or "local") if own else "",
        "is_lora": run.is_lora,
        "corrupted": False,
        "lora_rank": run.lora_rank,
        "last_request_time": iso_time(last_request),
        "last_checkpoint": None if latest["weights"] is None else checkpoint_record(latest["weights"]),
        "last_sampler_checkpoint": None if latest["sampler_weights"] is None else
        checkpoint_record(latest["sampler_weights"]),
        "user_metadata": str_dict(run.user_metadata) if own else None,
    }


def run_record(engine: EngineAPI, run: RunInfo, own: bool) -> dict[str, Any]:
    """`training_run_record` of `run` with its live checkpoints, read from `engine`."""
    return training_run_record(run, live(engine.list_checkpoints(run.run_id)), own)


def page(items: list, offset: int, limit: int) -> tuple[list, dict[str, int]]:
    """items[offset:offset + limit] and the SDK's Cursor of it."""
    return items[offset:offset + limit], {"offset": offset, "limit": limit, "total_count": len(items)}


def checkpoint_listing(ckpts: list[CheckpointInfo], offset: int = 0, limit: int | None = None) -> dict[str, Any]:
    """The SDK's CheckpointsListResponse of ckpts[offset:offset + limit] (limit None: all of them)."""
    shown, cursor = page(ckpts, offset, len(ckpts) if limit is None else limit)
    return {"checkpoints": [checkpoint_record(c) for c in shown], "cursor": cursor}
