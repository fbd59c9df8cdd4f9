"""A small blocking WebSocket client (RFC 6455): binary frames only, one socket.

The CLI must start fast and must not import aiohttp, so it speaks the handful of framing rules
it needs itself. Sending is safe from several threads (a lock); receiving belongs to one thread.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import BinaryIO, cast

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_CONT, _OP_TEXT, _OP_BIN, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_MAX_HEADER_BYTES = 64 * 1024


class HandshakeRefused(Exception):
    """The server answered the upgrade with an HTTP status instead of switching protocols."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ConnectionClosed(Exception):
    """The peer closed the WebSocket (or the socket broke)."""

    def __init__(self, code: int = 1006, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}{': ' + reason if reason else ''})")
        self.code, self.reason = code, reason


class FrameTooLarge(Exception):
    pass


@dataclass
class Message:
    data: bytes
    text: bool = False


def _mask(payload: bytes, key: bytes) -> bytes:
    """XOR the payload with the 4-byte key, using big-int arithmetic (fast in CPython)."""
    if key == b"\0\0\0\0" or not payload:
        return payload
    n = len(payload)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little"
    )


class WebSocket:
    """One client connection. ``mask_frames`` is off only where no HTTP intermediary can sit
    between us and the daemon (a Unix socket, TLS): masking exists to protect such proxies, and
    skipping it saves a copy of every upload chunk."""

    def __init__(self, sock: socket.socket, *, mask_frames: bool, max_frame: int) -> None:
        self._sock = sock
        self._reader = cast(BinaryIO, sock.makefile("rb", buffering=256 * 1024))
        self._send_lock = threading.Lock()
        self._mask_frames = mask_frames
        self._max_frame = max_frame
        self.closed = False

    # -- handshake -------------------------------------------------------------------------
    def handshake(self, host: str, path: str, headers: dict[str, str]) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        self._sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        status, response_headers = self._read_http_head()
        if status != 101:
            body = self._read_body(response_headers)
            code, message = "unavailable", f"daemon refused the connection (HTTP {status})"
            try:
                error = json.loads(body)["error"]
                code, message = str(error["code"]), str(error["message"])
            except (ValueError, KeyError, TypeError):
                pass
            raise HandshakeRefused(status, code, message)
        digest = hashlib.sha1(key.encode() + _GUID, usedforsecurity=False).digest()
        expected = base64.b64encode(digest).decode()
        if response_headers.get("sec-websocket-accept") != expected:
            raise ConnectionClosed(1002, "bad Sec-WebSocket-Accept from server")

    def _read_http_head(self) -> tuple[int, dict[str, str]]:
        raw = b""
        while not raw.endswith(b"\r\n\r\n"):
            line = self._reader.readline(_MAX_HEADER_BYTES)
            if not line:
                raise ConnectionClosed(1006, "connection closed during the handshake")
            raw += line
            if len(raw) > _MAX_HEADER_BYTES:
                raise ConnectionClosed(1002, "oversized HTTP response head")
        head = raw.decode("latin-1").split("\r\n")
        parts = head[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ConnectionClosed(1002, f"not an HTTP response: {head[0][:80]!r}")
        headers = {}
        for header in head[1:]:
            if ":" in header:
                name, _, value = header.partition(":")
                headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def _read_body(self, headers: dict[str, str]) -> bytes:
        try:
            length = min(int(headers.get("content-length", "0")), _MAX_HEADER_BYTES)
        except ValueError:
            return b""
        return self._reader.read(length) if length else b""

    # -- frames ------------------------------------------------------------------------------
    def send_binary(self, payload: bytes) -> None:
        self._send_frame(_OP_BIN, payload)

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        first = 0x80 | opcode
        if n < 126:
            header = struct.pack("!BB", first, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", first, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", first, 0x80 | 127, n)
        key = os.urandom(4) if self._mask_frames else b"\0\0\0\0"
        body = _mask(payload, key)
        with self._send_lock:
            if self.closed:
                raise ConnectionClosed(1006, "connection already closed")
            try:
                if n < 16384:
                    self._sock.sendall(header + key + body)
                else:
                    self._sock.sendall(header + key)
                    self._sock.sendall(body)
            except OSError as exc:
                self.closed = True
                raise ConnectionClosed(1006, str(exc)) from exc

    def _read_exact(self, n: int) -> bytes:
        try:
            data = self._reader.read(n)
        except ValueError as exc:  # close() from another thread released the reader mid-read
            raise ConnectionClosed(1006, "connection closed") from exc
        if data is None or len(data) != n:
            raise ConnectionClosed(1006, "connection lost")
        return data

    def receive(self) -> Message:
        """Next data message; answers pings, raises ConnectionClosed on close."""
        fragments: list[bytes] = []
        text = False
        while True:
            try:
                b1, b2 = self._read_exact(2)
            except OSError as exc:
                raise ConnectionClosed(1006, str(exc)) from exc
            fin, opcode = b1 & 0x80, b1 & 0x0F
            length = b2 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._read_exact(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._read_exact(8))
            # servers never mask; tolerate it anyway
            key = self._read_exact(4) if b2 & 0x80 else b"\0\0\0\0"
            if length > self._max_frame:
                raise FrameTooLarge(f"daemon sent a {length}-byte frame")
            payload = _mask(self._read_exact(length), key) if length else b""
            if opcode == _OP_PING:
                self._send_frame(_OP_PONG, payload)
                continue
            if opcode == _OP_PONG:
                continue
            if opcode == _OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                reason = payload[2:].decode("utf-8", "replace")
                self._reply_close(code)
                raise ConnectionClosed(code, reason)
            if opcode in (_OP_TEXT, _OP_BIN):
                text = opcode == _OP_TEXT
            fragments.append(payload)
            if sum(map(len, fragments)) > self._max_frame:
                raise FrameTooLarge("daemon sent an oversized message")
            if fin:
                return Message(b"".join(fragments), text)

    def _reply_close(self, code: int) -> None:
        with contextlib.suppress(ConnectionClosed):
            self._send_frame(_OP_CLOSE, struct.pack("!H", 1000 if code == 1005 else code))
        self.closed = True

    def send_text(self, text: str) -> None:
        """Only for tests of the daemon's refusal of text frames."""
        self._send_frame(_OP_TEXT, text.encode())

    def close(self, code: int = 1000) -> None:
        if not self.closed:
            with contextlib.suppress(ConnectionClosed):
                self._send_frame(_OP_CLOSE, struct.pack("!H", code))
            self.closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError, ValueError):
            self._reader.close()
        self._sock.close()
