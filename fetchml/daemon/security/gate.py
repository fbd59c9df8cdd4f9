"""The TCP listener's front door: which connections are accepted, and for how long without a key.

A connection from outside ``ip_allowlist`` (and not from a trusted proxy, whose clients are
judged on their request) is closed at accept, before TLS. An accepted connection has one
deadline for its TLS handshake, its HTTP request and the session's hello; until its hello it is
*pending*, and pending connections are capped per address and in total, so slow or silent peers
cannot hold the daemon's descriptors or memory. The Unix socket does not pass through here: the
local admin is always served.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from fetchml.daemon.security.netpolicy import NetworkPolicy, parse_address

log = logging.getLogger(__name__)

ACCEPT_BACKOFF_S = 0.1  # after accept(2) fails (no descriptors, no memory), as asyncio does
ACCEPT_LOG_INTERVAL_S = 60.0  # accept failures are logged at most once per interval
# Once this many pending connections have all gone, the freed memory is handed back to the
# system (each TLS connection had a 256 KiB read buffer; malloc keeps what it freed).
TRIM_AFTER = 64


@dataclass(eq=False)
class _Pending:
    """One accepted connection that has not said hello yet."""

    address: str
    timer: asyncio.TimerHandle | None = None
    transport: asyncio.BaseTransport | None = None
    done: bool = False


@dataclass
class GateCounts:
    """What the gate did, for logs, metrics and tests."""

    accepted: int = 0
    refused_address: int = 0
    refused_full: int = 0
    expired: int = 0
    accept_errors: int = 0


class ConnectionGate:
    def __init__(self, *, policy: NetworkPolicy | None, deadline: float, per_address: int,
                 total: int, on_refuse: Callable[[str], None] | None = None) -> None:
        self.policy, self.deadline = policy, deadline
        self.on_refuse = on_refuse  # told "address", "full" or "deadline" for each refusal
        self.per_address, self.total = per_address, total
        self.counts = GateCounts()
        self._pending: set[_Pending] = set()
        self._by_transport: dict[asyncio.BaseTransport, _Pending] = {}
        self._by_address: dict[str, int] = {}
        self._last_accept_log = 0.0
        self._unlogged_errors = 0
        self._high_water = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def serve(self, sock: socket.socket, protocol_factory: Callable[[], asyncio.Protocol],
                    ssl_context: ssl.SSLContext | None) -> None:
        """Accept connections on ``sock`` until cancelled."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    conn, peer = await loop.sock_accept(sock)
                except OSError as exc:  # no descriptors, no memory, a peer gone at once...
                    self._accept_failed(exc)  # ...: the listener goes on, as asyncio's does
                    await asyncio.sleep(ACCEPT_BACKOFF_S)
                    continue
                pending = self._admit(conn, peer)
                if pending is not None:
                    task = loop.create_task(self._open(pending, conn, protocol_factory,
                                                       ssl_context))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()

    def admitted(self, transport: asyncio.BaseTransport | None) -> None:
        """The connection said hello with a valid identity: no deadline and no cap from now."""
        pending = self._by_transport.get(transport) if transport is not None else None
        if pending is not None:
            self._release(pending)

    # -- internals ----------------------------------------------------------------------------
    def _admit(self, conn: socket.socket, peer: object) -> _Pending | None:
        host = peer[0] if isinstance(peer, tuple) and peer else ""
        address = parse_address(str(host))
        if self.policy is not None and not (self.policy.allows(address) or
                                            self.policy.is_trusted_proxy(address)):
            self.counts.refused_address += 1
            self._refused("address")
            _close(conn)
            return None
        key = str(address)
        if self._full(key):
            self._forget_closed()
            if self._full(key):
                self.counts.refused_full += 1
                self._refused("full")
                _close(conn)
                return None
        conn.setblocking(False)
        pending = _Pending(key)
        self._pending.add(pending)
        self._high_water = max(self._high_water, len(self._pending))
        self._by_address[key] = self._by_address.get(key, 0) + 1
        self.counts.accepted += 1
        pending.timer = asyncio.get_running_loop().call_later(self.deadline, self._expire,
                                                              pending)
        return pending

    def _full(self, address: str) -> bool:
        return (len(self._pending) >= self.total or
                self._by_address.get(address, 0) >= self.per_address)

    async def _open(self, pending: _Pending, conn: socket.socket,
                    protocol_factory: Callable[[], asyncio.Protocol],
                    ssl_context: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(
                protocol_factory, conn, ssl=ssl_context,
                ssl_handshake_timeout=self.deadline if ssl_context is not None else None)
        except (OSError, ssl.SSLError, TimeoutError, asyncio.CancelledError):
            _close(conn)
            self._release(pending)
            return
        if pending.done:  # the deadline passed while TLS finished
            transport.abort()
            return
        pending.transport = transport
        self._by_transport[transport] = pending

    def _expire(self, pending: _Pending) -> None:
        if pending.done:
            return
        self.counts.expired += 1
        self._refused("deadline")
        transport = pending.transport
        self._release(pending)
        if transport is not None:
            transport.abort()  # type: ignore[attr-defined]

    def _refused(self, reason: str) -> None:
        if self.on_refuse is not None:
            self.on_refuse(reason)

    def _release(self, pending: _Pending) -> None:
        if pending.done:
            return
        pending.done = True
        if pending.timer is not None:
            pending.timer.cancel()
        self._pending.discard(pending)
        if pending.transport is not None:
            self._by_transport.pop(pending.transport, None)
        left = self._by_address.get(pending.address, 1) - 1
        if left > 0:
            self._by_address[pending.address] = left
        else:
            self._by_address.pop(pending.address, None)
        if not self._pending and self._high_water >= TRIM_AFTER:
            self._high_water = 0
            asyncio.get_running_loop().call_later(1.0, _trim_heap)  # once their buffers are gone

    def _forget_closed(self) -> None:
        """Pending connections that their peers already closed stop counting."""
        for pending in list(self._pending):
            if pending.transport is not None and pending.transport.is_closing():
                self._release(pending)

    def _accept_failed(self, exc: OSError) -> None:
        self.counts.accept_errors += 1
        self._unlogged_errors += 1
        now = time.monotonic()
        if now - self._last_accept_log >= ACCEPT_LOG_INTERVAL_S:
            log.error("cannot accept TCP connections (%s; %d times since the last report); "
                      "raise LimitNOFILE or lower max_pending_connections",
                      exc.strerror or exc, self._unlogged_errors)
            self._last_accept_log, self._unlogged_errors = now, 0


def _trim_heap() -> None:
    """glibc's malloc_trim: return free heap pages to the system (a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()
