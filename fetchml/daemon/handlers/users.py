"""admin.users.* and admin.audit: API keys, roles, and the audit log."""

from __future__ import annotations

import asyncio
from typing import Any

from fetchml.daemon.handlers import Call, handles
from fetchml.protocol import ops
from fetchml.protocol.schema import NoArgs


@handles(ops.ADMIN_USERS_ADD)
async def admin_users_add(call: Call[ops.AdminUsersAddArgs]) -> dict[str, Any]:
    args = call.args
    record, key = await asyncio.to_thread(call.core.auth.registry.add, args["name"],
                                          args["role"], args["uid"])
    return {"name": record.name, "role": record.role, "key": key}


@handles(ops.ADMIN_USERS_LIST)
async def admin_users_list(call: Call[NoArgs]) -> dict[str, Any]:
    return {"users": [user.public() for user in call.core.auth.registry.all()]}


@handles(ops.ADMIN_USERS_REVOKE)
async def admin_users_revoke(call: Call[ops.AdminUsersRevokeArgs]) -> dict[str, Any]:
    record = await asyncio.to_thread(call.core.auth.registry.revoke, call.args["name"])
    return {"name": record.name, "revoked_at": record.revoked_at}


@handles(ops.ADMIN_AUDIT)
async def admin_audit(call: Call[ops.AdminAuditArgs]) -> dict[str, Any]:
    audit = call.core.auth.audit
    result: dict[str, Any] = {}
    if call.args["verify"]:
        result.update((await asyncio.to_thread(audit.verify)).to_dict())
    result["entries"] = await asyncio.to_thread(audit.tail, call.args["tail"])
    return result
