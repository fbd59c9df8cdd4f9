"""Recorded frames still decode, re-encode byte for byte, and a live daemon answers them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from fetchml.errors import NotFound, error_from_wire
from fetchml.protocol import CLIENT_LIMITS, decode, encode, parse_request
from tests.conftest import DaemonProcess
from tests.integration.test_session import raw_ws

FRAMES = Path(__file__).resolve().parent.parent / "protocol_frames"
INDEX: dict[str, dict[str, Any]] = json.loads((FRAMES / "frames.json").read_text())


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


@pytest.mark.parametrize("name", sorted(INDEX))
def test_recorded_frame_decodes_and_reencodes_identically(name: str) -> None:
    data = (FRAMES / f"{name}.msgpack").read_bytes()
    expected = from_json(INDEX[name]["value"])
    decoded = decode(data, CLIENT_LIMITS)
    assert decoded == expected
    assert encode(decoded) == data
    assert list(decoded) == list(expected)  # key order is part of the recorded bytes
    if INDEX[name]["request"]:
        parse_request(expected)


def test_recorded_error_reply_becomes_the_right_exception() -> None:
    error = from_json(INDEX["error_reply"]["value"])["error"]
    exc = error_from_wire(error["code"], error["message"], error["details"])
    assert isinstance(exc, NotFound) and "fetchml status" in str(exc)


def test_recorded_requests_replayed_against_a_live_daemon(daemon: DaemonProcess) -> None:
    ws = raw_ws(daemon)
    order = ["hello_request", "ping_request", "ping_request_without_args", "info_request",
             "monitor_request"]
    for name in order:
        ws.send_binary((FRAMES / f"{name}.msgpack").read_bytes())
    replies: dict[int, dict[str, Any]] = {}
    events = 0
    while len(replies) < 4 or events == 0:
        frame = msgpack.unpackb(ws.receive().data)
        if "event" in frame:
            events += 1
        else:
            replies[frame["id"]] = frame
    assert all(replies[i]["ok"] for i in range(4))
    assert replies[0]["result"]["protocol"] == 1
    assert set(replies[3]["result"]) >= {"protocol", "daemon", "user", "role", "host"}
    ws.send_binary((FRAMES / "stream_cancel_request.msgpack").read_bytes())
    finals = {}
    while len(finals) < 2:
        frame = msgpack.unpackb(ws.receive().data)
        if "event" not in frame:
            finals[frame["id"]] = frame
    assert finals[4]["result"] == {"cancelled": True}
    assert finals[5]["result"] == {"cancelled": True}
    ws.close()
