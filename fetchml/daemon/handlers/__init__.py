"""Op handlers, one module per group of ops, registered against the op's declaration.

A handler is ``async def handler(call: Call[Args]) -> result``, registered with
``@handles(ops.SOME_OP)``; ``call.args`` is the op's arguments, checked, typed as the op
declares them. The session enforces the op's declared policy (permissions, audit, rate limit,
ordering) around every handler; a handler checks only what depends on the arguments or the
data (e.g. ``jobs:read:all`` for other users' jobs). Stream handlers emit events with
``await call.emit(event, data)`` before returning their final result.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from fetchml.daemon.security.ownership import READABLE_OBJECTS_KEY, READABLE_SNAPSHOTS_KEY
from fetchml.errors import PermissionDenied
from fetchml.protocol.ops import CATALOGUE, CONNECTION_OPS
from fetchml.protocol.schema import OpSpec

if TYPE_CHECKING:
    from fetchml.daemon.core import DaemonCore
    from fetchml.daemon.security.auth import Identity
    from fetchml.daemon.session import Session

A = TypeVar("A", bound=Mapping[str, Any])


@dataclass
class Call(Generic[A]):
    """One request being handled: who asked, with what, on which connection."""

    core: DaemonCore
    session: Session
    identity: Identity
    request_id: int
    op: str
    args: A
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


Handler = Callable[[Call[A]], Awaitable[Any]]
HANDLERS: dict[str, Handler[Any]] = {}


def handles(spec: OpSpec[A]) -> Callable[[Handler[A]], Handler[A]]:
    """Register ``fn`` as the handler of the op ``spec`` declares (one of the catalogue's)."""
    if CATALOGUE.get(spec.name) is not spec or spec.name in CONNECTION_OPS:
        raise ValueError(f"{spec.name} is not an op of the protocol catalogue with a handler")

    def register(fn: Handler[A]) -> Handler[A]:
        HANDLERS[spec.name] = fn
        return fn

    return register


def load_all() -> dict[str, Handler[Any]]:
    """Import every handler module so that each registers its ops."""
    from fetchml.daemon.handlers import (  # noqa: F401
        admin,
        cas,
        cluster,
        datasets,
        host,
        jobs,
        logs,
        outputs,
        prune,
        training,
        users,
    )

    return HANDLERS


# -- what a connection may read (see fetchml/daemon/security/ownership.py) ----------------------

async def resolve_snapshot(call: Call[Any], text: str) -> str:
    """The snapshot ``text`` names, among those the caller may read."""
    granted = call.session.state.get(READABLE_SNAPSHOTS_KEY, ())
    return await call.core.resolve_snapshot(text, reader=call.identity, granted=granted)


def grant_snapshots(call: Call[Any], *snapshots: str | None) -> None:
    """Let this connection read these snapshots (of a job it was allowed to see)."""
    granted = call.session.state.setdefault(READABLE_SNAPSHOTS_KEY, set())
    granted.update(s for s in snapshots if s)


def grant_objects(call: Call[Any], oids: Iterable[str]) -> None:
    """Let this connection download these objects (named by a manifest it read)."""
    call.session.state.setdefault(READABLE_OBJECTS_KEY, set()).update(oids)


def may_read_snapshot(call: Call[Any], snapshot: str) -> bool:
    granted = call.session.state.get(READABLE_SNAPSHOTS_KEY, ())
    return call.core.may_read_snapshot(call.identity, snapshot, granted)


def may_read_object(call: Call[Any], oid: str) -> bool:
    return (call.core.reads_everything(call.identity) or
            oid in call.session.state.get(READABLE_OBJECTS_KEY, ()))
