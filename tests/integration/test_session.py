"""The session against a real daemon: hello, pipelining, streams, limits, bad input, stop."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import msgpack
import pytest

from fetchml.client.websocket import ConnectionClosed, WebSocket
from fetchml.errors import BadRequest, DaemonStopped, Unavailable
from fetchml.protocol import PROTOCOL_VERSION, encode
from tests.conftest import DaemonProcess, make_inprocess_daemon


def raw_ws(daemon: DaemonProcess) -> WebSocket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(daemon.socket))
    ws = WebSocket(sock, mask_frames=True, max_frame=64 << 20)
    ws.handshake("localhost", "/ws", {})
    return ws


def say_hello(ws: WebSocket) -> dict:
    ws.send_binary(encode({"id": 0, "op": "hello", "args": {"protocol": 1}}))
    reply = msgpack.unpackb(ws.receive().data)
    assert reply["ok"], reply
    return reply


def closed_with(ws: WebSocket) -> int:
    """Read until the daemon closes; return the close code."""
    try:
        while True:
            ws.receive()
    except ConnectionClosed as exc:
        return exc.code
    finally:
        ws.close()


def still_serving(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        assert "time" in conn.call("host.ping")


def test_hello_reports_protocol_user_and_host(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        hello = conn.hello
    assert hello["protocol"] == PROTOCOL_VERSION
    assert hello["daemon"].startswith("fetchml/")
    assert hello["role"] == "admin"
    assert hello["host"]["cpus"] >= 1 and hello["host"]["gpus"] == []


def test_newer_client_protocol_is_answered_with_ours(daemon: DaemonProcess) -> None:
    ws = raw_ws(daemon)
    ws.send_binary(encode({"id": 7, "op": "hello", "args": {"protocol": 99, "client": "x"}}))
    reply = msgpack.unpackb(ws.receive().data)
    assert reply["id"] == 7 and reply["result"]["protocol"] == PROTOCOL_VERSION
    ws.close()


def test_thousand_pipelined_requests_each_answered_once(daemon: DaemonProcess) -> None:
    ws = raw_ws(daemon)
    say_hello(ws)
    ids = list(range(1, 1001))
    for request_id in ids:
        ws.send_binary(encode({"id": request_id, "op": "host.ping"}))
    seen: list[int] = []
    while len(seen) < len(ids):
        reply = msgpack.unpackb(ws.receive().data)
        assert reply["ok"] and "time" in reply["result"]
        seen.append(reply["id"])
    assert sorted(seen) == ids
    ws.close()


def test_pipelined_requests_through_the_client(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        pending = [conn.send("host.ping") for _ in range(1000)]
        results = [p.result() for p in pending]
    assert len({p.id for p in pending}) == 1000
    assert all("time" in r for r in results)


def test_stream_cancelled_midway_then_connection_still_works(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        stream = conn.stream("host.monitor", {"interval": 0.05})
        events = stream.events()
        got = [next(events) for _ in range(3)]
        assert all(e.event == "host" and "free" in e.data for e in got)
        stream.cancel()
        rest = list(events)  # drains until the final reply
        assert len(rest) <= 2
        assert stream.final == {"cancelled": True}
        assert conn.call("stream.cancel", {"target": stream.id}) == {"cancelled": False}
        assert "time" in conn.call("host.ping")


def test_unknown_op_and_bad_arguments_get_bad_request(daemon: DaemonProcess) -> None:
    with daemon.connect() as conn:
        with pytest.raises(BadRequest, match="unknown op"):
            conn.call("jobs.frobnicate")
        with pytest.raises(BadRequest, match="needs argument 'target'"):
            conn.call("stream.cancel", {})
        with pytest.raises(BadRequest, match="must be an integer"):
            conn.call("stream.cancel", {"target": "seven"})
        with pytest.raises(BadRequest, match="does not take argument"):
            conn.call("host.ping", {"bogus": 1})
        with pytest.raises(BadRequest, match="must be between"):
            conn.call("host.monitor", {"interval": 0.0})
        assert "time" in conn.call("host.ping")


BAD_FRAMES = [
    ("not msgpack", b"\xc1\xc1\xc1", 1002),
    ("not a map", encode([1, 2, 3]), 1002),  # type: ignore[arg-type]
    ("bin32 claiming 4 GiB", b"\x81\xa4data\xc6" + struct.pack(">I", 2**32 - 1) + b"ab",
     1002),
    ("nested 100,000 deep", b"\x91" * 100_000 + b"\xc0", 1002),
    ("deeper than the depth limit", b"\x81\xa1a" + b"\x91" * 40 + b"\xc0", 1008),
    ("int map key", b"\x81\x01\x01", 1002),
    ("envelope without op", encode({"id": 1, "args": {}}), 1002),
    ("negative id", encode({"id": -1, "op": "host.ping"}), 1002),
    ("extra envelope key", encode({"id": 1, "op": "host.ping", "x": 1}), 1002),
    ]


@pytest.mark.parametrize(("name", "payload", "code"), BAD_FRAMES,
                         ids=[case[0] for case in BAD_FRAMES])
def test_bad_frames_close_only_that_connection(daemon: DaemonProcess, name: str,
                                               payload: bytes, code: int) -> None:
    ws = raw_ws(daemon)
    say_hello(ws)
    ws.send_binary(payload)
    assert closed_with(ws) == code, name
    still_serving(daemon)


def test_text_frame_is_refused(daemon: DaemonProcess) -> None:
    ws = raw_ws(daemon)
    say_hello(ws)
    ws.send_text("{}")
    assert closed_with(ws) == 1003
    still_serving(daemon)


def test_frame_one_byte_over_the_limit_and_16_mib_of_zeros(daemon: DaemonProcess) -> None:
    limit = 8 * 1024 * 1024
    for size in (limit + 1, 16 * 1024 * 1024):
        ws = raw_ws(daemon)
        say_hello(ws)
        # The daemon refuses on the frame header, so it may close before the body is sent.
        with contextlib.suppress(ConnectionClosed):
            ws.send_binary(b"\0" * size)
        assert closed_with(ws) == 1009
        still_serving(daemon)
    ws = raw_ws(daemon)
    say_hello(ws)
    at_limit = encode({"id": 1, "op": "host.ping", "args": {}})
    ws.send_binary(at_limit)
    assert msgpack.unpackb(ws.receive().data)["ok"]
    ws.close()


def test_request_id_reused_while_in_flight_closes(daemon: DaemonProcess) -> None:
    ws = raw_ws(daemon)
    say_hello(ws)
    ws.send_binary(encode({"id": 5, "op": "host.monitor", "args": {"interval": 10}}))
    first = msgpack.unpackb(ws.receive().data)
    assert first["event"] == "host"
    ws.send_binary(encode({"id": 5, "op": "host.ping"}))
    assert closed_with(ws) == 1002
    still_serving(daemon)


def test_request_before_hello_is_refused(daemon: DaemonProcess) -> None:
    ws = raw_ws(daemon)
    ws.send_binary(encode({"id": 1, "op": "host.ping"}))
    reply = msgpack.unpackb(ws.receive().data)
    assert reply["error"]["code"] == "bad_request"
    assert closed_with(ws) == 1008


def test_too_many_requests_in_flight(short_tmp: Path) -> None:
    daemon = make_inprocess_daemon(short_tmp, FETCHML_MAX_IN_FLIGHT="4").start()
    try:
        ws = raw_ws(daemon)
        say_hello(ws)
        for request_id in range(1, 6):
            ws.send_binary(encode({"id": request_id, "op": "host.monitor",
                                   "args": {"interval": 10}}))
        assert closed_with(ws) == 1008
        still_serving(daemon)
    finally:
        daemon.stop()


def test_silent_client_is_closed_after_the_handshake_timeout(short_tmp: Path) -> None:
    daemon = make_inprocess_daemon(short_tmp, FETCHML_HANDSHAKE_TIMEOUT="0.5").start()
    try:
        ws = raw_ws(daemon)
        started = time.monotonic()
        assert closed_with(ws) == 1008
        assert 0.4 < time.monotonic() - started < 5
        still_serving(daemon)
    finally:
        daemon.stop()


def test_sigterm_with_requests_in_flight_ends_them_cleanly(
        daemon_process: DaemonProcess) -> None:
    daemon = daemon_process
    conn = daemon.connect()
    stream = conn.stream("host.monitor", {"interval": 0.05})
    events = stream.events()
    next(events)
    outcome: list[BaseException | str] = []

    def pinger() -> None:
        try:
            while True:
                conn.call("host.ping")
        except (Unavailable, DaemonStopped) as exc:
            outcome.append(exc)

    thread = threading.Thread(target=pinger)
    thread.start()
    time.sleep(0.1)
    assert daemon.stop(signal.SIGTERM) == 0
    with pytest.raises((Unavailable, DaemonStopped)) as info:
        list(events)
    assert "stopping" in str(info.value) or "closed" in str(info.value)
    thread.join(timeout=10)
    conn.close()
    assert not thread.is_alive() and outcome
    assert "stopping" in daemon.log()


def test_health_endpoint_answers_plain_http(daemon: DaemonProcess) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.socket))
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert b'"status": "ok"' in data


def test_a_websocket_closed_under_its_reader_reports_a_closed_connection() -> None:
    # Ctrl-C closes a connection from the main thread while its reader thread is reading.
    ours, theirs = socket.socketpair()
    with contextlib.closing(theirs):
        ws = WebSocket(ours, mask_frames=True, max_frame=1 << 20)
        ws.close()
        with pytest.raises(ConnectionClosed):
            ws.receive()

