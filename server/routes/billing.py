"""GET /billing/usage/checkpoints/current: the checkpoint storage of the caller's key (AdminClient's
get_current_checkpoint_storage_usage and `tinker billing checkpoint-storage` call it; wire doc §2.8).

One item: the checkpoints of the runs the caller's key owns, counted by the engine (`EngineAPI.storage_usage`). This
server has no projects, organisations or prices, so `project_id` is accepted and ignored and no cost is estimated.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from server.deps import EngineDep, OwnerDep

router = APIRouter()

GIGABYTE = 10**9  # the storage billing unit of the SDK's size_gigabytes


@router.get("/billing/usage/checkpoints/current")
async def current_checkpoint_storage(engine: EngineDep, owner: OwnerDep, project_id: str | None = None
                                     ) -> dict[str, Any]:
    count, size = await asyncio.to_thread(engine.storage_usage, owner)
    return {"data": [{"checkpoint_count": int(count), "size_bytes": int(size), "size_gigabytes": size / GIGABYTE}]}
