"""host.*: who am I, what does this host have, is the daemon alive."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fetchml.daemon.handlers import Call, handles


@handles("host.info")
async def host_info(call: Call) -> dict[str, Any]:
    call.require("host:read")
    return {**call.session.hello_result(), **(await call.core.host_status())}


@handles("host.ping")
async def host_ping(call: Call) -> dict[str, Any]:
    return {"time": time.time()}


@handles("host.monitor")
async def host_monitor(call: Call) -> dict[str, Any]:
    call.require("host:read")
    interval = float(call.args["interval"])
    while True:
        await call.emit("host", {"time": time.time(), **(await call.core.host_status())})
        await asyncio.sleep(interval)
