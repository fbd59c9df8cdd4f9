"""Wire limits: what one frame and one connection may hold before the daemon refuses it."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024

# Blobs travel in cas.put chunks of at most this many bytes, so any file moves in bounded memory.
CHUNK_BYTES = 4 * MiB


@dataclass(frozen=True)
class Limits:
    # A cas.put frame carries up to CHUNK_BYTES of data plus its envelope; 8 MiB leaves room.
    max_frame_bytes: int = 8 * MiB
    # Real messages nest 4-5 levels (reply > result > jobs > job > env); 32 is generous.
    max_depth: int = 32
    max_str_len: int = 1 * MiB
    max_bin_len: int = 8 * MiB
    # cas.missing batches and job lists are the long arrays; keep their batches under this.
    max_array_len: int = 100_000
    max_map_len: int = 10_000
    # Pipelined requests one connection may have unanswered at once.
    max_in_flight: int = 1024
    # Seconds a new connection has to send hello, and an idle connection (nothing in flight,
    # no stream open) is kept before the daemon closes it.
    handshake_timeout: float = 10.0
    idle_timeout: float = 600.0


# The CLI trusts the daemon more than the daemon trusts its clients, but still bounds what it
# decodes: replies such as a job list can be larger than any request.
CLIENT_LIMITS = Limits(
    max_frame_bytes=64 * MiB,
    max_bin_len=64 * MiB,
    max_str_len=64 * MiB,
    max_array_len=10_000_000,
    max_map_len=1_000_000,
)


class CloseCode:
    """WebSocket close codes (RFC 6455 section 7.4.1) the daemon ends a connection with."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the daemon is stopping
    PROTOCOL_ERROR = 1002  # not msgpack, not a map, bad envelope, id reused
    UNSUPPORTED_DATA = 1003  # a text frame
    POLICY_VIOLATION = 1008  # limits: depth, in-flight, handshake timeout, auth revoked
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
