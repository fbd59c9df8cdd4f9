"""The codec: round trips of every message shape, and a decoder that only ever raises
the protocol's own error."""

from __future__ import annotations

import contextlib
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fetchml.errors import ProtocolViolation
from fetchml.protocol import (
    CATALOGUE,
    Limits,
    decode,
    encode,
    parse_request,
    reply_error,
    reply_ok,
    stream_event,
)

LIMITS = Limits()

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False), st.text(max_size=50), st.binary(max_size=200),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
    ),
    max_leaves=30,
)
request_ids = st.integers(0, 2**63 - 1)
args = st.dictionaries(st.text(max_size=10), values, max_size=5)
messages = st.one_of(
    st.builds(lambda i, op, a: {"id": i, "op": op, "args": a}, request_ids,
              st.sampled_from(sorted(CATALOGUE)), args),
    st.builds(reply_ok, request_ids, values),
    st.builds(reply_error, request_ids,
              st.sampled_from(["bad_request", "not_found", "internal"]),
              st.text(max_size=40), st.dictionaries(st.text(max_size=5), values, max_size=3)),
    st.builds(stream_event, request_ids, st.sampled_from(["log", "chunk", "job", "host"]),
              values),
)


@given(messages)
def test_every_message_shape_round_trips(message: dict) -> None:
    assert decode(encode(message), LIMITS) == message


@given(st.builds(lambda i, op, a: {"id": i, "op": op, "args": a}, request_ids,
                 st.text(min_size=1, max_size=20), args))
def test_requests_parse_back(message: dict) -> None:
    request = parse_request(decode(encode(message), LIMITS))
    assert (request.id, request.op, request.args) == (message["id"], message["op"],
                                                      message["args"])


@settings(max_examples=500)
@given(st.binary(max_size=2000))
def test_decoder_fuzz_raises_only_protocol_errors(data: bytes) -> None:
    try:
        value = decode(data, LIMITS)
    except ProtocolViolation:
        return
    assert isinstance(value, dict)


@settings(max_examples=300)
@given(messages, st.integers(0, 200), st.integers(0, 255))
def test_corrupted_frames_raise_only_protocol_errors(message: dict, at: int, byte: int) -> None:
    data = bytearray(encode(message))
    if data:
        data[at % len(data)] = byte
    with contextlib.suppress(ProtocolViolation):
        decode(bytes(data), LIMITS)


@pytest.mark.parametrize(
    "data",
    [
        b"\x91" * 100_000 + b"\xc0",
        b"\x81\xa4data\xc6" + struct.pack(">I", 2**32 - 1) + b"ab",
        b"\xdd" + struct.pack(">I", 2**32 - 1),
        msgpack.packb({b"bytes-key": 1}),
        msgpack.packb(msgpack.ExtType(1, b"x")),
        msgpack.packb({}) + b"\x00",
        b"",
    ],
)
def test_hostile_frames_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        decode(data, LIMITS)


def test_frame_size_is_checked_before_decoding() -> None:
    small = Limits(max_frame_bytes=10)
    with pytest.raises(ProtocolViolation) as info:
        decode(encode({"id": 1, "op": "x" * 20}), small)
    assert info.value.close_code == 1009


def test_depth_limit() -> None:
    nested: object = 1
    for _ in range(40):
        nested = [nested]
    with pytest.raises(ProtocolViolation) as info:
        decode(encode({"a": nested}), LIMITS)
    assert info.value.close_code == 1008
    assert decode(encode({"a": [[[1]]]}), LIMITS) == {"a": [[[1]]]}


def test_bool_is_not_an_id() -> None:
    with pytest.raises(ProtocolViolation):
        parse_request({"id": True, "op": "host.ping"})


def test_every_op_is_documented() -> None:
    for spec in CATALOGUE.values():
        assert spec.doc.endswith(".") or spec.doc.endswith(")"), spec.name
        assert all(arg.doc for arg in spec.args), spec.name
