"""Op handlers, one module per group of ops, registered by name.

A handler is ``async def handler(call: Call) -> result``. Stream handlers emit events with
``await call.emit(event, data)`` before returning their final result.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fetchml.errors import PermissionDenied
from fetchml.protocol.ops import CATALOGUE

if TYPE_CHECKING:
    from fetchml.daemon.core import DaemonCore
    from fetchml.daemon.security.auth import Identity
    from fetchml.daemon.session import Session

Handler = Callable[["Call"], Awaitable[Any]]
HANDLERS: dict[str, Handler] = {}

# Ops a session runs one at a time in arrival order (an upload's chunks must be appended in
# order); everything else runs concurrently.
ORDERED_OPS = frozenset({"cas.put"})


@dataclass
class Call:
    """One request being handled: who asked, with what, on which connection."""

    core: DaemonCore
    session: Session
    identity: Identity
    request_id: int
    op: str
    args: dict[str, Any]
    events_sent: int = field(default=0)

    async def emit(self, event: str, data: Any) -> None:
        self.events_sent += 1
        await self.session.send_event(self.request_id, event, data)

    def require(self, permission: str) -> None:
        if not self.identity.allows(permission):
            raise PermissionDenied(
                f"user {self.identity.user} (role {self.identity.role}) may not do this "
                f"({permission}); ask an admin for a role that allows it"
            )


def handles(op: str) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of ``op`` (which must be in the protocol catalogue)."""
    if op not in CATALOGUE:
        raise ValueError(f"{op} is not in the protocol catalogue")

    def register(fn: Handler) -> Handler:
        HANDLERS[op] = fn
        return fn

    return register


def load_all() -> dict[str, Handler]:
    """Import every handler module so that each registers its ops."""
    from fetchml.daemon.handlers import (  # noqa: F401
        admin,
        cas,
        cluster,
        datasets,
        host,
        jobs,
        logs,
        metrics,
        prune,
        users,
    )

    return HANDLERS
