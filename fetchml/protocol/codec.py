"""Encoding and decoding of frames, with every limit checked before a handler sees a value."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from fetchml.errors import ProtocolViolation
from fetchml.protocol.limits import CloseCode, Limits

MAX_REQUEST_ID = 2**63 - 1
_ENVELOPE_KEYS = frozenset({"id", "op", "args"})


def encode(message: Mapping[str, Any]) -> bytes:
    """Pack one message; bytes become msgpack bin, str stays str."""
    try:
        return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolViolation(
            f"cannot encode message: {exc}", close_code=CloseCode.INTERNAL_ERROR
        ) from exc


def decode(data: bytes, limits: Limits) -> dict[str, Any]:
    """Unpack one frame into a map, refusing anything outside ``limits``.

    The frame size is checked before unpacking; string, bin, array and map lengths are checked by
    the unpacker before it allocates (so a bin32 header claiming 4 GiB costs nothing), and its
    fixed internal stack bounds nesting during the unpack; the configured depth and the rule
    "map keys are str" are checked on the result before anyone uses it.
    """
    if len(data) > limits.max_frame_bytes:
        raise ProtocolViolation(
            f"frame of {len(data)} bytes is over the {limits.max_frame_bytes}-byte limit",
            close_code=CloseCode.MESSAGE_TOO_BIG,
        )
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except (ValueError, TypeError, RecursionError) as exc:
        raise ProtocolViolation(
            f"frame is not a valid msgpack value within limits ({exc or type(exc).__name__})",
            close_code=CloseCode.PROTOCOL_ERROR,
        ) from exc
    if not isinstance(value, dict):
        raise ProtocolViolation(
            f"a frame must be a msgpack map, not {type(value).__name__}",
            close_code=CloseCode.PROTOCOL_ERROR,
        )
    check_shape(value, limits.max_depth)
    return value


def check_shape(value: Any, max_depth: int) -> None:
    """Refuse nesting deeper than ``max_depth`` and map keys that are not str (iteratively)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise ProtocolViolation(
                f"message nests deeper than {max_depth} levels",
                close_code=CloseCode.POLICY_VIOLATION,
            )
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise ProtocolViolation(
                        "map keys must be strings", close_code=CloseCode.PROTOCOL_ERROR
                    )
                if isinstance(child, (dict, list)):
                    stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: dict[str, Any]


def parse_request(message: dict[str, Any]) -> Request:
    """Check a decoded frame is a request envelope: ``{"id": int, "op": str, "args": map}``."""
    extra = set(message) - _ENVELOPE_KEYS
    if extra:
        raise ProtocolViolation(
            f"unknown envelope keys {sorted(extra)}; a request holds only id, op and args",
            close_code=CloseCode.PROTOCOL_ERROR,
        )
    request_id = message.get("id")
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise ProtocolViolation(
            "a request needs an integer id between 0 and 2**63-1",
            close_code=CloseCode.PROTOCOL_ERROR,
        )
    op = message.get("op")
    if not isinstance(op, str) or not op:
        raise ProtocolViolation(
            "a request needs an op name string", close_code=CloseCode.PROTOCOL_ERROR
        )
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolViolation(
            "a request's args must be a map", close_code=CloseCode.PROTOCOL_ERROR
        )
    return Request(id=request_id, op=op, args=args)


def reply_ok(request_id: int, result: Any) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}


def reply_error(
    request_id: int | None, code: str, message: str, details: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "id": request_id,
        "ok": False,
        "error": {"code": code, "message": message, "details": dict(details or {})},
    }


def stream_event(request_id: int, event: str, data: Any) -> dict[str, Any]:
    return {"id": request_id, "event": event, "data": data}
