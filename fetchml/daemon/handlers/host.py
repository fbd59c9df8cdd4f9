"""host.*: who am I, what does this host have, is the daemon alive."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fetchml.daemon.handlers import Call, handles
from fetchml.protocol import ops
from fetchml.protocol.schema import NoArgs


@handles(ops.HOST_INFO)
async def host_info(call: Call[NoArgs]) -> dict[str, Any]:
    return {**call.session.hello_result(), **(await call.core.host_status())}


@handles(ops.HOST_PING)
async def host_ping(call: Call[NoArgs]) -> dict[str, Any]:
    return {"time": time.time()}


@handles(ops.HOST_MONITOR)
async def host_monitor(call: Call[ops.HostMonitorArgs]) -> dict[str, Any]:
    interval = float(call.args["interval"])
    while True:
        await call.emit("host", {"time": time.time(), **(await call.core.host_status())})
        await asyncio.sleep(interval)
