"""The CLI's connection to a daemon: hello, requests (pipelined), streams.

A reader thread takes every incoming frame and hands it to the request it answers, so the
caller can send many requests before reading any reply (uploads do) without deadlocking on
full socket buffers.
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fetchml import __version__
from fetchml.client.websocket import (
    ConnectionClosed,
    FrameTooLarge,
    HandshakeRefused,
    WebSocket,
)
from fetchml.errors import (
    ConfigError,
    DaemonStopped,
    DaemonUnreachable,
    FetchmlError,
    ProtocolViolation,
    error_from_wire,
)
from fetchml.protocol import CLIENT_LIMITS, PROTOCOL_VERSION, decode, encode, ops

if TYPE_CHECKING:
    import ssl  # imported when used: only remote daemons need it, and it is slow to load

log = logging.getLogger(__name__)
_CLOSED = object()  # sentinel put on every waiting queue when the connection ends


@dataclass(frozen=True)
class Target:
    """Where the daemon is: a Unix socket path, or a ws:// / wss:// URL."""

    socket_path: str | None = None
    url: str | None = None

    def describe(self) -> str:
        return self.url or f"unix socket {self.socket_path}"


@dataclass
class StreamEvent:
    event: str
    data: Any


class Pending:
    """A request sent and not yet answered; ``result()`` waits for its reply."""

    def __init__(self, conn: Connection, request_id: int, op: str) -> None:
        self.conn, self.id, self.op = conn, request_id, op
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def _next(self) -> dict[str, Any]:
        item = self.queue.get()
        if item is _CLOSED:
            raise self.conn.closed_error()
        return item  # type: ignore[no-any-return]

    def result(self) -> Any:
        while True:
            message = self._next()
            if "event" not in message:
                return self.conn.finish(self.id, message)

    def events(self) -> Iterator[StreamEvent]:
        """Yield stream events until the final reply; its result is kept in ``self.final``."""
        while True:
            message = self._next()
            if "event" in message:
                yield StreamEvent(str(message["event"]), message.get("data"))
            else:
                self.final = self.conn.finish(self.id, message)
                return

    def cancel(self) -> None:
        """Ask the daemon to end this stream; its final reply still arrives."""
        self.conn.call(ops.STREAM_CANCEL.name, {"target": self.id})


class Connection:
    def __init__(self, ws: WebSocket, target: Target) -> None:
        self.ws, self.target = ws, target
        self._ids = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._lock = threading.Lock()
        self._close_reason: ConnectionClosed | None = None
        self.hello: dict[str, Any] = {}
        self._reader = threading.Thread(target=self._read_loop, name="fetchml-reader",
                                        daemon=True)
        self._reader.start()

    # -- requests ---------------------------------------------------------------------------
    def send(self, op: str, args: Mapping[str, Any] | None = None) -> Pending:
        """Send one request without waiting for its reply."""
        pending = Pending(self, next(self._ids), op)
        with self._lock:
            if self._close_reason is not None:
                raise self.closed_error()
            self._pending[pending.id] = pending
        frame = encode({"id": pending.id, "op": op, "args": dict(args or {})})
        try:
            self.ws.send_binary(frame)
        except ConnectionClosed as exc:
            self._shutdown(exc)
            raise self.closed_error() from exc
        return pending

    def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        return self.send(op, args).result()

    def stream(self, op: str, args: Mapping[str, Any] | None = None) -> Pending:
        return self.send(op, args)

    def finish(self, request_id: int, message: dict[str, Any]) -> Any:
        with self._lock:
            self._pending.pop(request_id, None)
        if message.get("ok"):
            return message.get("result")
        error = message.get("error") or {}
        raise error_from_wire(
            str(error.get("code", "internal")),
            str(error.get("message", "the daemon reported an error without a message")),
            error.get("details") if isinstance(error.get("details"), dict) else None,
        )

    # -- connection -------------------------------------------------------------------------
    def _read_loop(self) -> None:
        reason = ConnectionClosed(1006, "connection lost")
        try:
            while True:
                message = self.ws.receive()
                if message.text:
                    continue
                frame = decode(message.data, CLIENT_LIMITS)
                request_id = frame.get("id")
                with self._lock:
                    pending = self._pending.get(request_id) if isinstance(request_id, int) \
                        else None
                if pending is None:
                    log.debug("reply for unknown request id %r dropped", request_id)
                    continue
                pending.queue.put(frame)
        except ConnectionClosed as exc:
            reason = exc
        except (FrameTooLarge, ProtocolViolation, OSError) as exc:
            reason = ConnectionClosed(1002, str(exc))
        self._shutdown(reason)

    def _shutdown(self, reason: ConnectionClosed) -> None:
        with self._lock:
            if self._close_reason is None:
                self._close_reason = reason
            waiting = list(self._pending.values())
            self._pending.clear()
        for pending in waiting:
            pending.queue.put(_CLOSED)

    def closed_error(self) -> FetchmlError:
        reason = self._close_reason or ConnectionClosed()
        if reason.code == 1001:
            return DaemonStopped("the daemon is stopping and closed the connection; "
                                 "run the command again once it is back")
        detail = f": {reason.reason}" if reason.reason else ""
        return DaemonStopped(f"the daemon closed the connection (code {reason.code}{detail}); "
                             "run the command again, and check the daemon's log if it repeats")

    def close(self) -> None:
        self.ws.close()
        self._reader.join(timeout=2)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tls_wrap(raw: socket.socket, context: ssl.SSLContext, hostname: str) -> ssl.SSLSocket:
    """``raw`` after a TLS handshake; on failure every socket involved is closed.

    CPython's SSLSocket leaks itself when the peer resets the connection before the
    handshake (ssl.py's not-connected check re-raises without closing), as a daemon's gate
    does to refused peers: that socket is found in the traceback and closed here."""
    import ssl

    try:
        tls = context.wrap_socket(raw, server_hostname=hostname, do_handshake_on_connect=False)
    except OSError as exc:
        raw.close()
        tb = exc.__traceback__
        while tb is not None:
            leaked = tb.tb_frame.f_locals.get("self")
            if isinstance(leaked, ssl.SSLSocket):
                leaked.close()
            tb = tb.tb_next
        raise
    try:
        tls.do_handshake()
    except OSError:
        tls.close()
        raise
    return tls


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    import ssl  # only for remote daemons: keeps local start-up fast

    try:
        return ssl.create_default_context(cafile=ca_file)
    except OSError as exc:  # a missing file, or one that holds no PEM certificate
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot use ca_file {ca_file} ({reason}); give a PEM file of the CA "
                          "that signed the daemon's certificate") from exc


def _open_socket(target: Target, timeout: float, ca_file: str | None
                 ) -> tuple[socket.socket, str, str, bool]:
    """Connect; returns (socket, host header, path, whether frames must be masked)."""
    if target.socket_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(target.socket_path)
        except OSError as exc:
            sock.close()
            hint = "start it with `fetchml daemon`, or pass --socket/--url"
            raise DaemonUnreachable(
                f"cannot reach the daemon at {target.describe()} ({exc.strerror or exc}); {hint}"
            ) from exc
        return sock, "localhost", "/ws", False
    assert target.url is not None
    parts = urlsplit(target.url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(f"{target.url!r} is not a ws:// or wss:// URL; give "
                          "--url wss://HOST:PORT/ws (or ws:// on loopback)")
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    context = _tls_context(ca_file) if parts.scheme == "wss" else None
    try:
        sock = socket.create_connection((parts.hostname, port), timeout=timeout)
    except OSError as exc:
        raise DaemonUnreachable(
            f"cannot reach the daemon at {target.url} ({exc.strerror or exc}); "
            "check the URL and that the daemon listens there"
        ) from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if context is not None:
        try:
            sock = tls_wrap(sock, context, parts.hostname)
        except OSError as exc:  # ssl.SSLError is an OSError
            raise DaemonUnreachable(
                f"TLS handshake with {target.url} failed ({exc}); check the daemon's "
                "certificate, or set ca_file (FETCHML_CA_FILE) to the CA that signed it"
            ) from exc
    host = parts.netloc.rpartition("@")[2]
    return sock, host, parts.path or "/ws", parts.scheme == "ws"


def connect(target: Target, *, api_key: str | None = None, timeout: float = 10.0,
            ca_file: str | None = None) -> Connection:
    """Open a session: connect, upgrade, hello. Raises FetchmlError subclasses only."""
    sock, host, path, mask = _open_socket(target, timeout, ca_file)
    ws = WebSocket(sock, mask_frames=mask, max_frame=CLIENT_LIMITS.max_frame_bytes)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        ws.handshake(host, path, headers)
    except HandshakeRefused as exc:
        sock.close()
        raise error_from_wire(exc.code, exc.message, None) from exc
    except (ConnectionClosed, OSError) as exc:
        sock.close()
        raise DaemonUnreachable(
            f"the daemon at {target.describe()} did not complete the WebSocket handshake "
            f"({exc}); check that it is a fetchml daemon"
        ) from exc
    sock.settimeout(None)
    conn = Connection(ws, target)
    try:
        conn.hello = conn.call(ops.HELLO.name, {"protocol": PROTOCOL_VERSION,
                                                "client": f"fetchml/{__version__}"})
    except FetchmlError:
        conn.close()
        raise
    return conn
