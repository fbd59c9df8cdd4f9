"""The daemon's own client for other daemons of its cluster: protocol v1 over aiohttp.

A daemon talks to a peer exactly as the CLI does (WebSocket, msgpack, hello first), presenting
the cluster secret as its Bearer key, which gets it the peer's cluster identity. One
connection per peer is kept open and shared: requests are pipelined and their replies routed
by id, so concurrent object fetches and log streams share one socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from fetchml import __version__
from fetchml.daemon.tasks import cancel_and_wait
from fetchml.errors import FetchmlError, Unavailable, error_from_wire
from fetchml.protocol import CLIENT_LIMITS, PROTOCOL_VERSION, decode, encode, ops

log = logging.getLogger(__name__)

# A peer that does not accept a connection, or answer hello, within this long is treated as
# down: a fetch then tries the next host that may have the objects.
CONNECT_TIMEOUT_S = 5.0
_CLOSED: dict[str, Any] = {}  # put on every waiting queue when the connection ends


@dataclass
class PeerReply:
    """Events then the final reply of one request, as they arrive."""

    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)


class PeerConnection:
    """One open session with a peer daemon."""

    def __init__(self, name: str, url: str, ws: aiohttp.ClientWebSocketResponse,
                 http: aiohttp.ClientSession) -> None:
        self.name, self.url = name, url
        self._ws, self._http = ws, http
        self._ids = itertools.count(1)
        self._waiting: dict[int, PeerReply] = {}
        self._reader = asyncio.create_task(self._read(), name=f"peer-{name}")
        self.closed = False

    @classmethod
    async def open(cls, name: str, url: str, secret: str) -> PeerConnection:
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None,
                                                                    connect=CONNECT_TIMEOUT_S))
        try:
            ws = await http.ws_connect(url, headers={"Authorization": f"Bearer {secret}"},
                                       max_msg_size=CLIENT_LIMITS.max_frame_bytes,
                                       autoping=True, compress=0)
        except aiohttp.WSServerHandshakeError as exc:
            await http.close()
            raise Unavailable(f"host {name} refused this daemon ({exc.status}); give every "
                              "daemon of the cluster the same cluster_secret") from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            await http.close()
            raise Unavailable(f"cannot reach host {name} at {url} ({exc}); check that it "
                              "runs and that its advertised address is reachable") from exc
        conn = cls(name, url, ws, http)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await conn.call(ops.HELLO.name, {"protocol": PROTOCOL_VERSION,
                                                 "client": f"fetchml/{__version__} (peer)"})
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                if message.type != aiohttp.WSMsgType.BINARY:
                    continue
                try:
                    frame = decode(message.data, CLIENT_LIMITS)
                except FetchmlError as exc:
                    log.warning("host %s sent a bad frame (%s); dropping the connection",
                                self.name, exc)
                    break
                reply = self._waiting.get(frame.get("id"))  # type: ignore[arg-type]
                if reply is not None:
                    reply.queue.put_nowait(frame)
        except (aiohttp.ClientError, OSError) as exc:
            log.info("connection to host %s lost: %s", self.name, exc)
        finally:
            self.closed = True
            for reply in self._waiting.values():
                reply.queue.put_nowait(_CLOSED)

    async def _send(self, op: str, args: Mapping[str, Any]) -> tuple[int, PeerReply]:
        if self.closed:
            raise Unavailable(f"the connection to host {self.name} is closed; try again")
        request_id = next(self._ids)
        reply = self._waiting[request_id] = PeerReply()
        try:
            await self._ws.send_bytes(encode({"id": request_id, "op": op, "args": dict(args)}))
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            self._waiting.pop(request_id, None)
            raise Unavailable(f"cannot send to host {self.name} ({exc}); try again") from exc
        return request_id, reply

    async def _next(self, reply: PeerReply) -> dict[str, Any]:
        frame = await reply.queue.get()
        if frame is _CLOSED:
            raise Unavailable(f"host {self.name} closed the connection; try again")
        return frame

    @staticmethod
    def _result(frame: dict[str, Any]) -> Any:
        if frame.get("ok"):
            return frame.get("result")
        error = frame.get("error") or {}
        details = error.get("details")
        raise error_from_wire(str(error.get("code", "internal")),
                              str(error.get("message", "a peer reported an error")),
                              details if isinstance(details, dict) else None)

    async def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        """One request's result; the peer's error is raised as the matching FetchmlError."""
        request_id, reply = await self._send(op, args or {})
        try:
            while True:
                frame = await self._next(reply)
                if "event" not in frame:
                    return self._result(frame)
        finally:
            self._waiting.pop(request_id, None)

    @contextlib.asynccontextmanager
    async def stream(self, op: str, args: Mapping[str, Any]
                     ) -> AsyncIterator[PeerStream]:
        """A streaming request; leaving the block early asks the peer to end it."""
        request_id, reply = await self._send(op, args)
        stream = PeerStream(self, request_id, reply)
        try:
            yield stream
        finally:
            if not stream.done and not self.closed:
                with contextlib.suppress(FetchmlError):
                    await self.call(ops.STREAM_CANCEL.name, {"target": request_id})
            self._waiting.pop(request_id, None)

    async def close(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            await self._ws.close()
        await cancel_and_wait(self._reader)
        await self._http.close()


class PeerStream:
    """The events of one streaming request; ``result`` holds its final reply's result."""

    def __init__(self, conn: PeerConnection, request_id: int, reply: PeerReply) -> None:
        self._conn, self.id, self._reply = conn, request_id, reply
        self.done = False
        self.result: Any = None

    def __aiter__(self) -> PeerStream:
        return self

    async def __anext__(self) -> tuple[str, Any]:
        if self.done:
            raise StopAsyncIteration
        frame = await self._conn._next(self._reply)
        if "event" in frame:
            return str(frame["event"]), frame.get("data")
        self.done = True
        self.result = self._conn._result(frame)
        raise StopAsyncIteration


class PeerPool:
    """One shared connection per peer, opened on first use and again after it drops."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self._conns: dict[str, PeerConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, name: str, url: str) -> PeerConnection:
        async with self._locks.setdefault(name, asyncio.Lock()):
            conn = self._conns.get(name)
            if conn is not None and not conn.closed and conn.url == url:
                return conn
            if conn is not None:
                await conn.close()
            conn = self._conns[name] = await PeerConnection.open(name, url, self.secret)
            return conn

    async def close(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)
