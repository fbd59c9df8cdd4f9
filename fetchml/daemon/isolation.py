"""isolation: plugs into the daemon through attach()."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fetchml.daemon.app import DaemonCore


async def attach(core: DaemonCore, stack: contextlib.AsyncExitStack) -> None:
    """Register this feature's runner hooks, listeners and background tasks with core;
    anything that must be stopped goes on stack (closed when the daemon stops)."""
