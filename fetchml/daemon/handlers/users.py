"""admin.users.* and admin.audit: API keys, roles, and the audit log."""

from __future__ import annotations

import asyncio
from typing import Any

from fetchml.daemon.handlers import Call, handles


@handles("admin.users.add")
async def admin_users_add(call: Call) -> dict[str, Any]:
    call.require("admin:users")
    args = call.args
    record, key = await asyncio.to_thread(call.core.auth.registry.add, args["name"],
                                          args["role"], args["uid"])
    return {"name": record.name, "role": record.role, "key": key}


@handles("admin.users.list")
async def admin_users_list(call: Call) -> dict[str, Any]:
    call.require("admin:users")
    return {"users": [user.public() for user in call.core.auth.registry.all()]}


@handles("admin.users.revoke")
async def admin_users_revoke(call: Call) -> dict[str, Any]:
    call.require("admin:users")
    record = await asyncio.to_thread(call.core.auth.registry.revoke, call.args["name"])
    return {"name": record.name, "revoked_at": record.revoked_at}


@handles("admin.audit")
async def admin_audit(call: Call) -> dict[str, Any]:
    call.require("admin:audit")
    audit = call.core.auth.audit
    result: dict[str, Any] = {}
    if call.args["verify"]:
        result.update((await asyncio.to_thread(audit.verify)).to_dict())
    result["entries"] = await asyncio.to_thread(audit.tail, call.args["tail"])
    return result
