"""One WebSocket connection: handshake, limits, dispatch by id, streams, shutdown.

Each op's declared policy (``fetchml.protocol.schema.OpSpec``) is enforced here, for every op,
around its handler: the rate limit before the arguments are read, the permissions once they
are checked, the audit record after a success, and arrival order for ordered ops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from fetchml import __version__, logctx
from fetchml.daemon.handlers import HANDLERS, Call
from fetchml.daemon.tasks import cancel_and_wait
from fetchml.errors import BadRequest, FetchmlError, ProtocolViolation, RateLimited
from fetchml.protocol import (
    CATALOGUE,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    CloseCode,
    Request,
    decode,
    encode,
    parse_request,
    reply_error,
    reply_ok,
    stream_event,
)
from fetchml.protocol.ops import HELLO, STREAM_CANCEL
from fetchml.protocol.schema import OpSpec

if TYPE_CHECKING:
    from fetchml.daemon.core import DaemonCore
    from fetchml.daemon.security.auth import Identity

log = logging.getLogger(__name__)

# How long in-flight requests may run on after the daemon is asked to stop, before they are
# answered with "unavailable"; short, since systemd waits for us.
SHUTDOWN_GRACE_S = 5.0
# Chunk-sized payloads (cas.get's 4 MiB chunks) a connection may have read and queued at once:
# a client that asks for many objects and reads slowly holds this much of the daemon's memory,
# not a chunk per request.
LARGE_SENDS = 4
# A frame the peer does not take within this long ends the connection: a client that stopped
# reading (or vanished without the kernel telling us) must not hold its requests forever.
SEND_STALL_S = 60.0
STOPPING_SEND_S = 1.0  # the same, once the daemon is stopping


def audit(call: Call[Any], result: Any) -> None:
    """Record a successful state-changing request, with a summary of what it did."""
    summary: dict[str, Any] = {}
    if isinstance(result, dict) and isinstance(result.get("jobs"), list):
        summary["jobs"] = [j.get("id") for j in result["jobs"] if isinstance(j, dict)]
        summary["names"] = [j.get("name") for j in result["jobs"] if isinstance(j, dict)]
    for key in ("name", "role", "reason", "snapshot"):
        if isinstance(call.args.get(key), str):
            summary[key] = call.args[key]
    call.core.auth.audit.record(call.op, user=call.identity.user, peer=call.identity.source,
                                **summary)


class _StreamCancelled(Exception):
    """Raised inside a stream's task when the client asked to end it."""


class Session:
    def __init__(self, core: DaemonCore, ws: web.WebSocketResponse, identity: Identity,
                 peer: str, transport: asyncio.BaseTransport | None = None) -> None:
        self.core, self.ws, self.identity, self.peer = core, ws, identity, peer
        self.transport = transport  # to abort a stalled connection
        self.limits = core.limits
        self.in_flight: dict[int, asyncio.Task[None] | None] = {}
        self.streams: set[int] = set()
        self._cancelled_streams: set[int] = set()
        self._send_lock = asyncio.Lock()
        self.large_sends = asyncio.Semaphore(LARGE_SENDS)  # see LARGE_SENDS
        self._stopping = False
        self.protocol = 0
        # Per-connection state of handlers (e.g. uploads in progress) and how to release it.
        self.state: dict[str, Any] = {}
        self.cleanups: list[Callable[[], None]] = []

    # -- sending ----------------------------------------------------------------------------
    async def send(self, message: dict[str, Any]) -> None:
        data = encode(message)
        async with self._send_lock:
            if self.ws.closed:
                return
            patience = STOPPING_SEND_S if self._stopping else SEND_STALL_S
            try:
                await asyncio.wait_for(self.ws.send_bytes(data), patience)
            except TimeoutError:
                log.info("%s took no data for %g s; closing its connection", self.peer, patience)
                self.abort()
            except (ConnectionError, RuntimeError):
                pass

    def abort(self) -> None:
        """Drop the connection at once: every read and write on it ends."""
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    async def send_event(self, request_id: int, event: str, data: Any) -> None:
        if request_id in self._cancelled_streams:
            raise _StreamCancelled
        await self.send(stream_event(request_id, event, data))

    async def close(self, code: int, reason: str) -> None:
        log.info("closing session of %s (%s): %s", self.identity.user, self.peer, reason)
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > 0:  # type: ignore[attr-defined]
            # the peer is not taking what is queued: a close frame would wait behind it forever
            self.abort()
            return
        await self.ws.close(code=code, message=reason.encode()[:120])

    # -- main loop --------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            if not await self._handshake():
                return
            await self._serve()
        except ProtocolViolation as exc:
            log.info("protocol violation from %s: %s", self.peer, exc)
            await self.close(exc.close_code, str(exc))
        finally:
            await self._cancel_all("the connection closed")
            for cleanup in self.cleanups:
                try:
                    await asyncio.to_thread(cleanup)
                except Exception:
                    log.exception("session cleanup failed")

    async def _receive_frame(self, wait_s: float | None) -> dict[str, Any] | None:
        """Next decoded frame; None when the connection is over."""
        msg = await self.ws.receive(timeout=wait_s)
        if msg.type == WSMsgType.BINARY:
            return decode(msg.data, self.limits)
        if msg.type == WSMsgType.TEXT:
            raise ProtocolViolation("text frames are not part of the protocol; send binary "
                                    "msgpack", close_code=CloseCode.UNSUPPORTED_DATA)
        if msg.type == WSMsgType.ERROR:
            log.info("connection from %s failed: %s", self.peer, msg.data)
        return None

    async def _handshake(self) -> bool:
        try:
            frame = await self._receive_frame(self.limits.handshake_timeout)
        except TimeoutError:
            await self.close(CloseCode.POLICY_VIOLATION,
                             f"no hello within {self.limits.handshake_timeout:g} s")
            return False
        if frame is None:
            return False
        request = parse_request(frame)
        if request.op != HELLO.name:
            await self.send(reply_error(request.id, BadRequest.code,
                                        "the first request must be hello"))
            await self.close(CloseCode.POLICY_VIOLATION, "the first request must be hello")
            return False
        try:
            args = HELLO.validate(request.args)
        except BadRequest as exc:
            await self.send(reply_error(request.id, exc.code, exc.message))
            await self.close(CloseCode.PROTOCOL_ERROR, "bad hello")
            return False
        agreed = min(int(args["protocol"]), PROTOCOL_VERSION)
        if agreed < MIN_PROTOCOL_VERSION:
            message = (f"client speaks protocol {args['protocol']} but this daemon needs "
                       f"{MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}; upgrade fetchml")
            await self.send(reply_error(request.id, BadRequest.code, message))
            await self.close(CloseCode.PROTOCOL_ERROR, "no common protocol version")
            return False
        self.protocol = agreed
        log.debug("hello from %s (%s) as %s", self.peer, args["client"], self.identity.user)
        await self.send(reply_ok(request.id, self.hello_result()))
        if self.core.connections is not None and self.transport is not None:
            self.core.connections.admitted(self.transport)  # no longer pending at the gate
        return True

    def hello_result(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "daemon": f"fetchml/{__version__}",
            "user": self.identity.user,
            "role": self.identity.role,
            "host": self.core.inventory.to_dict(),
        }

    async def _serve(self) -> None:
        while not self.ws.closed:
            idle = not self.in_flight and not self.streams
            deadline = self.limits.idle_timeout if idle else None
            try:
                frame = await self._receive_frame(deadline)
            except TimeoutError:
                if not self.in_flight:
                    await self.close(CloseCode.NORMAL, "idle for too long")
                    return
                continue
            if frame is None:
                return
            await self._dispatch(parse_request(frame))

    async def _dispatch(self, request: Request) -> None:
        if request.id in self.in_flight:
            raise ProtocolViolation(f"request id {request.id} is already in flight",
                                    close_code=CloseCode.PROTOCOL_ERROR)
        if len(self.in_flight) >= self.limits.max_in_flight:
            raise ProtocolViolation(
                f"more than {self.limits.max_in_flight} requests in flight",
                close_code=CloseCode.POLICY_VIOLATION)
        if self._stopping:
            await self.send(reply_error(request.id, "unavailable",
                                        "the daemon is stopping; retry once it is back"))
            return
        if request.op == STREAM_CANCEL.name:
            await self._cancel_stream(request)
            return
        if not self.core.auth.still_valid(self.identity):
            await self.send(reply_error(request.id, "unauthenticated",
                                        "your access was revoked; ask an admin for a new key"))
            await self.close(CloseCode.POLICY_VIOLATION, "access revoked")
            return
        spec, handler = CATALOGUE.get(request.op), HANDLERS.get(request.op)
        if spec is not None and spec.rate_limited:
            try:
                self.core.auth.charge_submit(self.identity)
            except RateLimited as exc:
                await self.send(reply_error(request.id, exc.code, exc.message, exc.details))
                return
        if spec is None or handler is None or request.op == HELLO.name:
            message = ("hello was already sent" if request.op == HELLO.name else
                       f"unknown op {request.op!r}; this daemon speaks protocol "
                       f"{PROTOCOL_VERSION}, upgrade it if the CLI is newer")
            await self.send(reply_error(request.id, BadRequest.code, message))
            return
        try:
            args = spec.validate(request.args)
        except BadRequest as exc:
            await self.send(reply_error(request.id, exc.code, exc.message))
            return
        call = Call(self.core, self, self.identity, request.id, request.op, args)
        if spec.stream:
            self.streams.add(request.id)
        if spec.ordered:
            self.in_flight[request.id] = None
            await self._run(call, spec)
        else:
            self.in_flight[request.id] = asyncio.create_task(self._run(call, spec))

    async def _run(self, call: Call[Any], spec: OpSpec[Any]) -> None:
        started = time.monotonic()
        logctx.request_id.set(f"{self.identity.user}:{call.request_id}")
        try:
            for permission in spec.permissions:
                call.require(permission)
            result = await HANDLERS[call.op](call)
            await self.send(reply_ok(call.request_id, result))
            if spec.audited:
                audit(call, result)
        except _StreamCancelled:
            await self.send(reply_ok(call.request_id, {"cancelled": True}))
        except FetchmlError as exc:
            await self.send(reply_error(call.request_id, exc.code, exc.message, exc.details))
        except asyncio.CancelledError:
            if call.request_id in self._cancelled_streams:
                await self.send(reply_ok(call.request_id, {"cancelled": True}))
            else:
                await self.send(reply_error(call.request_id, "unavailable",
                                            "the daemon is stopping; run the command again "
                                            "once it is back"))
        except Exception:
            log.exception("op %s (request %d) failed", call.op, call.request_id)
            await self.send(reply_error(call.request_id, "internal",
                                        f"{call.op} failed inside the daemon; the daemon's log "
                                        "has the details, report them"))
        finally:
            self.in_flight.pop(call.request_id, None)
            self.streams.discard(call.request_id)
            self._cancelled_streams.discard(call.request_id)
            self.core.metrics.observe_request(call.op, time.monotonic() - started)

    async def _cancel_stream(self, request: Request) -> None:
        try:
            args = STREAM_CANCEL.validate(request.args)
        except BadRequest as exc:
            await self.send(reply_error(request.id, exc.code, exc.message))
            return
        target = args["target"]
        task = self.in_flight.get(target)
        running = target in self.streams and task is not None
        if running and task is not None:
            self._cancelled_streams.add(target)
            task.cancel()
        await self.send(reply_ok(request.id, {"cancelled": running}))

    # -- shutdown ---------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Let plain requests finish for a moment, end streams, then close with 1001."""
        self._stopping = True
        for request_id in list(self.streams):
            task = self.in_flight.get(request_id)
            if task is not None:
                task.cancel()
        tasks = [t for t in self.in_flight.values() if t is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE_S)
        await self._cancel_all("the daemon is stopping")
        await self.close(CloseCode.GOING_AWAY, "the daemon is stopping")

    async def _cancel_all(self, why: str) -> None:
        tasks = [t for t in self.in_flight.values() if t is not None and not t.done()]
        if tasks:
            log.debug("cancelling %d requests: %s", len(tasks), why)
        await cancel_and_wait(*tasks)
