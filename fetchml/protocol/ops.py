"""The op catalogue: every op's name, arguments, result and stream events.

This file is part of the protocol specification (see the package docstring);
``python -c "import fetchml.protocol.ops as o; print(o.describe())"`` prints it as text.
Requests name jobs by strings (``"job": "42"``; ``after`` also takes ints) so that a later id
scheme does not break clients; results and events carry job ids as ints (``"id": 42``).
"""

from __future__ import annotations

from fetchml.protocol import ops_cluster, ops_datasets, ops_metrics
from fetchml.protocol.schema import Arg, OpSpec, in_range, non_negative

PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1

HELLO = OpSpec(
    "hello",
    "Opens the session; must be the first request. The daemon answers with the protocol version "
    "both sides speak (the lower of the two) or refuses with bad_request and closes.",
    args=(
        Arg("protocol", int, "the highest protocol version the client speaks", required=True),
        Arg("client", str, "client name and version, e.g. fetchml/0.1.0", default=""),
    ),
    result='{"protocol", "daemon", "user", "role", "host": {"name", "cpus", "memory", "gpus"}}',
)

STREAM_CANCEL = OpSpec(
    "stream.cancel",
    "Ends a stream this connection opened; the stream's final reply is "
    '{"ok": true, "result": {"cancelled": true}}.',
    args=(Arg("target", int, "the id of the stream request to end", required=True),),
    result='{"cancelled": bool} (false when the target was not a running stream)',
)

HOST_INFO = OpSpec(
    "host.info",
    "Who you are, the daemon's version, and this host's resources and their use.",
    result='{"protocol", "daemon", "user", "role", "host": {...}, "free": {"cpus", "memory", '
    '"gpus": [index]}, "jobs": {state: count}}',
)

HOST_PING = OpSpec("host.ping", "Answers at once; for latency checks.", result='{"time": float}')

HOST_MONITOR = OpSpec(
    "host.monitor",
    "Streams the host's free resources and job counts until cancelled.",
    args=(
        Arg(
            "interval",
            float,
            "seconds between events",
            default=1.0,
            check=in_range(0.05, 3600),
        ),
    ),
    stream=True,
    events='"host": {"time", "free": {...}, "jobs": {state: count}}',
    result='{"cancelled": true}',
)

CAS_MISSING = OpSpec(
    "cas.missing",
    "Which of these objects the daemon lacks (send at most 100,000 per call).",
    args=(Arg("oids", list, "object ids (64 hex)", required=True, items=str),),
    result='{"missing": [oid]} in the order given',
)

CAS_PUT = OpSpec(
    "cas.put",
    "Uploads object bytes. Each blob is one chunk of one object: "
    '{"oid", "size" (whole object), "offset", "data" (bin)}; an object larger than one chunk is '
    "sent as consecutive chunks, in order, on the same connection. Small objects are batched "
    "several to a frame. An object is stored once its last chunk arrives and its digest matches. "
    "Requests are processed in the order they arrive, so clients pipeline them freely.",
    args=(Arg("blobs", list, "chunks, at most 4 MiB of data in all", required=True, items=dict),),
    result='{"stored": [oid]} objects completed by this request',
)

CAS_GET = OpSpec(
    "cas.get",
    "Downloads an object in chunks; the daemon verifies the digest and ends with integrity "
    "instead of ok when the stored bytes are damaged.",
    args=(Arg("oid", str, "object id", required=True),),
    stream=True,
    events='"chunk": bin (at most 4 MiB)',
    result='{"oid", "size"}',
)

SNAPSHOT_PUT = OpSpec(
    "snapshot.put",
    "Stores a canonical snapshot manifest once every object it names is stored and durable. "
    "Send either the whole manifest, or a stored base snapshot and the changes to it.",
    args=(
        Arg("manifest", bytes, "canonical manifest encoding", default=None, nullable=True),
        Arg("base", str, "a stored snapshot the changes apply to", default=None,
            nullable=True),
        Arg("upsert", list, "manifest rows added or replaced (with base)", default=None,
            items=list, nullable=True),
        Arg("remove", list, "paths removed (with base)", default=None, items=str,
            nullable=True),
        Arg("expect", str, "the snapshot id the sender computed; a mismatch is refused",
            default=None, nullable=True),
    ),
    result='{"snapshot" (64 hex), "files", "bytes"}; integrity error listing missing objects',
)

SNAPSHOT_GET = OpSpec(
    "snapshot.get",
    "Returns a stored manifest; accepts any unique prefix of at least 6 hex digits.",
    args=(Arg("snapshot", str, "snapshot id or unique prefix", required=True),),
    result='{"snapshot", "manifest": bin, "files", "bytes"}',
)

JOB_FIELDS_DOC = (
    '{"argv": [str] (required), "name", "env": {str: str}, "workdir", "priority" (1-10), '
    '"cpus", "memory" (bytes), "gpus", "timeout" (s), "retries", "after": [job id], '
    '"labels": {str: str}, "datasets": ["NAME[@V][:MOUNT]"], "isolation": "none" | "bwrap" | '
    '"podman"}'
)

JOBS_SUBMIT = OpSpec(
    "jobs.submit",
    "Queues one job or many (a sweep) on a stored snapshot, atomically; acknowledged only once "
    "durable.",
    args=(
        Arg("snapshot", str, "snapshot id or unique prefix", required=True),
        Arg("jobs", list, f"job specs, each {JOB_FIELDS_DOC}", required=True, items=dict),
        Arg(
            "supersede",
            dict,
            "cancel your still-queued jobs whose labels contain all these pairs (reason "
            "superseded) in the same step",
            default=None,
            items=str,
            nullable=True,
        ),
    ),
    result='{"jobs": [job]}',
)

JOBS_LIST = OpSpec(
    "jobs.list",
    "Jobs, newest first. Without states: active jobs plus the most recent finished ones.",
    args=(
        Arg("states", list, "only these states", default=None, items=str, nullable=True),
        Arg("owner", str, "only this user's jobs", default=None, nullable=True),
        Arg("all_users", bool, "everyone's jobs (needs jobs:read:all)", default=False),
        Arg("limit", int, "at most this many", default=50, check=in_range(1, 100_000)),
        Arg("before", int, "only jobs with a smaller id (paging)", default=None, nullable=True),
    ),
    result='{"jobs": [job]}',
)

JOBS_GET = OpSpec(
    "jobs.get",
    "One job in detail.",
    args=(Arg("job", str, "job id", required=True),),
    result="job",
)

JOBS_CANCEL = OpSpec(
    "jobs.cancel",
    "Cancels queued, held or running jobs (running: TERM to the process group, a grace period, "
    "then KILL).",
    args=(
        Arg("jobs", list, "job ids", required=True, items=str),
        Arg("reason", str, "recorded with the job", default=""),
    ),
    result='{"jobs": [job]}',
)

JOBS_WAIT = OpSpec(
    "jobs.wait",
    "Waits until every job has ended; emits each job as it ends.",
    args=(
        Arg("jobs", list, "job ids", required=True, items=str),
        Arg("timeout", float, "give up after this many seconds", default=None, nullable=True),
    ),
    stream=True,
    events='"job": job, once per job as it ends',
    result='{"jobs": [job], "timed_out": bool}',
)

JOBS_LOGS = OpSpec(
    "jobs.logs",
    "A job's output (stdout and stderr interleaved) from a byte offset; with follow, new "
    "output as it is written until the job ends.",
    args=(
        Arg("job", str, "job id", required=True),
        Arg("attempt", int, "attempt number, default the latest", default=None, nullable=True),
        Arg("offset", int, "start at this byte", default=0, check=non_negative),
        Arg("follow", bool, "keep streaming until the job ends", default=False),
    ),
    stream=True,
    events='"log": bin',
    result='{"offset": next byte, "state": job state, "attempt"}',
)

JOBS_EVENTS = OpSpec(
    "jobs.events",
    "Every state change of the jobs you may see, as it happens, until cancelled.",
    args=(Arg("jobs", list, "only these job ids", default=None, items=str, nullable=True),),
    stream=True,
    events='"job": job',
    result='{"cancelled": true}',
)

ADMIN_FSCK = OpSpec(
    "admin.fsck",
    "Checks the object store: with read_data every object is re-hashed.",
    args=(Arg("read_data", bool, "re-hash every object", default=False),),
    result='{"objects", "snapshots", "problems": [{"kind", "oid", "message"}]}',
)

ADMIN_USERS_ADD = OpSpec(
    "admin.users.add",
    "Creates a user with a new API key; the key is in this reply and nowhere else, ever.",
    args=(
        Arg("name", str, "user name: lowercase letters, digits, _ . -", required=True),
        Arg("role", str, "admin, researcher, analyst, or a role from the config", required=True),
        Arg("uid", int, "local uid that maps to this user on the Unix socket", default=None,
            nullable=True),
    ),
    result='{"name", "role", "key"}',
)

ADMIN_USERS_LIST = OpSpec(
    "admin.users.list",
    "Every user, from the config and added at run time (never keys or their hashes).",
    result='{"users": [{"name", "role", "uid", "has_key", "created_at", "revoked_at", '
    '"source"}]}',
)

ADMIN_USERS_REVOKE = OpSpec(
    "admin.users.revoke",
    "Revokes a user's key; their open sessions are refused at their next request.",
    args=(Arg("name", str, "user name", required=True),),
    result='{"name", "revoked_at"}',
)

ADMIN_AUDIT = OpSpec(
    "admin.audit",
    "Checks the audit log's hash chain, or returns its last entries.",
    args=(
        Arg("verify", bool, "check the whole chain", default=False),
        Arg("tail", int, "how many recent entries to return", default=20,
            check=in_range(0, 10_000)),
    ),
    result='{"ok", "lines", "files", "bad_file", "bad_line", "reason", "entries": [...]}',
)

ADMIN_PRUNE = OpSpec(
    "admin.prune",
    "Deletes finished jobs' run directories and records (never held, queued or running ones), "
    "then garbage-collects objects no live root needs.",
    args=(
        Arg("older_than", float, "only jobs finished at least this many seconds ago",
            default=None, nullable=True, check=non_negative),
        Arg("keep", int, "keep this many of the newest selected jobs", default=None,
            nullable=True, check=non_negative),
        Arg("states", list, "only these final states", default=None, items=str, nullable=True),
        Arg("user", str, "only this user's jobs (others' need jobs:prune:all)", default=None,
            nullable=True),
        Arg("all_users", bool, "everyone's jobs (needs jobs:prune:all)", default=False),
        Arg("gc_grace", float, "collect objects older than this many seconds (admin only)",
            default=None, nullable=True, check=non_negative),
        Arg("collect", bool, "also garbage-collect the store", default=True),
        Arg("dry_run", bool, "report what would be freed; change nothing", default=False),
    ),
    result='{"jobs", "runs", "objects", "bytes", "snapshots", "dry_run"}',
)

SNAPSHOT_PIN = OpSpec(
    "snapshot.pin",
    "Keeps a snapshot (and every object it names) from garbage collection.",
    args=(Arg("snapshot", str, "snapshot id or unique prefix", required=True),),
    result='{"snapshot"}',
)

SNAPSHOT_UNPIN = OpSpec(
    "snapshot.unpin",
    "Lets garbage collection treat a pinned snapshot like any other again.",
    args=(Arg("snapshot", str, "snapshot id or unique prefix", required=True),),
    result='{"snapshot"}',
)

SNAPSHOT_PINS = OpSpec(
    "snapshot.pins",
    "Every pinned snapshot and who pinned it.",
    result='{"pins": [{"snapshot", "by"}]}',
)

# Ops of optional subsystems live in modules of their own.
_GROUPS = (*ops_cluster.OPS, *ops_datasets.OPS, *ops_metrics.OPS)

CATALOGUE: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        *_GROUPS,
        HELLO,
        STREAM_CANCEL,
        HOST_INFO,
        HOST_PING,
        HOST_MONITOR,
        CAS_MISSING,
        CAS_PUT,
        CAS_GET,
        SNAPSHOT_PUT,
        SNAPSHOT_GET,
        JOBS_SUBMIT,
        JOBS_LIST,
        JOBS_GET,
        JOBS_CANCEL,
        JOBS_WAIT,
        JOBS_LOGS,
        JOBS_EVENTS,
        ADMIN_FSCK,
        ADMIN_USERS_ADD,
        ADMIN_USERS_LIST,
        ADMIN_USERS_REVOKE,
        ADMIN_AUDIT,
        ADMIN_PRUNE,
        SNAPSHOT_PIN,
        SNAPSHOT_UNPIN,
        SNAPSHOT_PINS,
    )
}


def describe() -> str:
    """The whole catalogue as text."""
    return "\n\n".join(spec.describe() for spec in CATALOGUE.values())
