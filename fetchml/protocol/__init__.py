"""fetchml protocol, version 1: the specification.

Transport
    A WebSocket at path ``/ws``, on the daemon's Unix socket (local) or its TCP listener (TLS
    unless explicitly allowed otherwise). Authentication happens before the upgrade: on the Unix
    socket by peer credentials, unless an ``Authorization: Bearer <key>`` header is sent, which
    then takes precedence; on TCP by that header alone. A refused upgrade gets an HTTP status
    (401 unauthenticated, 403 forbidden, 429 rate limited) and a JSON body
    ``{"error": {"code", "message"}}``, and no WebSocket. Per-message compression is off.

Frames
    Every WebSocket message is a *binary* frame holding exactly one msgpack map (strings as
    msgpack str, blobs as msgpack bin, no ext types). A text frame, bytes that are not msgpack,
    or a value that is not a map closes the connection (close codes below). Map keys are
    strings.

Messages
    request   ``{"id": n, "op": "jobs.submit", "args": {...}}``; ``n`` is an integer in
              [0, 2**63-1] chosen by the client, unique among that connection's requests in
              flight; ``args`` may be omitted when empty.
    reply     ``{"id": n, "ok": true, "result": ...}`` or
              ``{"id": n, "ok": false, "error": {"code", "message", "details": {...}}}``.
    stream    ``{"id": n, "event": "log", "data": ...}`` zero or more times, then exactly one
              final reply with the same id.
    cancel    ``{"id": m, "op": "stream.cancel", "args": {"target": n}}`` ends stream ``n``,
              whose final reply is then ``{"ok": true, "result": {"cancelled": true}}``.

    The first request must be ``hello`` (``{"protocol": 2, "client": "fetchml/x.y"}``); the
    daemon answers with the protocol version both speak (the lower), the user and role it
    authenticated, and the host's resources, or ``bad_request`` and a close when no common
    version exists. Requests may be pipelined: the daemon answers each once, by id, in any
    order, except for ops declared ordered (``cas.put``), which a connection's requests run
    one at a time in arrival order. A request id reused while in flight closes the connection.

Versions
    2 (current) and 1 are spoken. They differ only in how a job is spelled: protocol 2 says
    ``gpus`` (how many GPUs, as on submit), ``gpu_ids`` (which were given) and ``retries`` (as
    on submit); a protocol 1 session gets ``gpus_requested``, ``gpus`` (the indices) and
    ``max_attempts`` (retries + 1) instead (``fetchml.protocol.job``).

Errors
    A closed set of codes (``fetchml.errors.ERROR_CODES``): ``bad_request``,
    ``unauthenticated``, ``permission_denied``, ``not_found``, ``conflict``, ``rate_limited``
    (details carry ``retry_after`` seconds), ``too_large``, ``integrity``, ``unavailable``,
    ``internal``. Messages are one sentence that says what to do. ``not_found`` and
    ``permission_denied`` never reveal whether another user's job exists: both look the same.

Limits (``fetchml.protocol.limits.Limits``, configurable on the daemon)
    Checked before a handler sees anything: frame size (8 MiB; over it: close 1009), nesting
    depth (32), string (1 MiB), bin (8 MiB), array (100,000) and map (10,000) lengths, str map
    keys, requests in flight per connection (1,024), hello within 10 s, idle connections closed
    after 600 s. Breaking a limit closes that connection; the daemon carries on.

Close codes
    1000 normal, 1001 daemon stopping (in-flight requests first get ``unavailable`` replies),
    1002 protocol error, 1003 text frame, 1008 policy (limits, no hello, access revoked),
    1009 frame too big, 1011 internal error.

Blobs
    ``cas.put`` chunks carry at most 4 MiB of data each, and ``cas.get`` streams chunks of at
    most 4 MiB, so a file of any size moves in bounded memory on both sides.

Policy
    Each op declares (``fetchml.protocol.schema.OpSpec``) the permissions its caller's role
    needs, whether successful calls are written to the audit log, whether calls are rate
    limited (``jobs.submit``), and whether they run in arrival order. The daemon enforces it
    for every op the same way: rate limit first (``rate_limited``), then the arguments
    (``bad_request``), then the permissions (``permission_denied``: "user U (role R) may not do
    this (PERMISSION); ask an admin for a role that allows it"). Some ops also check a
    permission that depends on what is asked (``jobs:read:all`` for others' jobs).

Ops
    The catalogue, with each op's policy, arguments, result and events, is
    ``fetchml.protocol.ops``; a job in results and events is ``fetchml.protocol.job.WireJob``.
    Checked-in sample frames under ``tests/protocol_frames/`` are replayed by the test suite so
    that the wire format cannot drift by accident.
"""

from fetchml.protocol.codec import (
    Request,
    decode,
    encode,
    parse_request,
    reply_error,
    reply_ok,
    stream_event,
)
from fetchml.protocol.limits import CHUNK_BYTES, CLIENT_LIMITS, CloseCode, Limits
from fetchml.protocol.ops import CATALOGUE, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION

__all__ = [
    "CATALOGUE",
    "CHUNK_BYTES",
    "CLIENT_LIMITS",
    "MIN_PROTOCOL_VERSION",
    "PROTOCOL_VERSION",
    "CloseCode",
    "Limits",
    "Request",
    "decode",
    "encode",
    "parse_request",
    "reply_error",
    "reply_ok",
    "stream_event",
]
