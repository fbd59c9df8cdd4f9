"""admin.*: store checks and other operator tasks."""

from __future__ import annotations

import asyncio
from typing import Any

from fetchml.cas.fsck import fsck
from fetchml.daemon.handlers import Call, handles
from fetchml.protocol import ops


@handles(ops.ADMIN_FSCK)
async def admin_fsck(call: Call[ops.AdminFsckArgs]) -> dict[str, Any]:
    core = call.core
    problems = await asyncio.to_thread(fsck, core.objects, core.snapshots,
                                       read_data=bool(call.args["read_data"]))
    objects, _ = await asyncio.to_thread(core.objects.stats)
    snapshots, _ = await asyncio.to_thread(core.snapshots.stats)
    return {
        "objects": objects,
        "snapshots": snapshots,
        "problems": [{"kind": p.kind, "oid": p.oid, "message": p.message} for p in problems],
    }
