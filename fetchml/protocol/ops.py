"""The op catalogue: every op's name, arguments, result and stream events.

Each op is declared once, here, with its policy: the permissions it needs, whether it is
audited, rate limited or run in arrival order, and its arguments (``Arg``s, and a
``TypedDict`` of them that handlers read); see ``fetchml.protocol.schema.OpSpec``. A ``job`` in
results and events is ``fetchml.protocol.job.WireJob``; the jobs of ``jobs.submit`` are
``JobSubmission``s. Callers name ops by their spec (``ops.JOBS_SUBMIT.name``).

This file is part of the protocol specification (see the package docstring);
``python -c "import fetchml.protocol.ops as o; print(o.describe())"`` prints it as text.
Requests name jobs by strings (``"job": "42"``; ``after`` also takes ints) so that a later id
scheme does not break clients; results and events carry job ids as ints (``"id": 42``).
"""

from __future__ import annotations

from typing import Any, TypedDict

from fetchml.protocol import ops_cluster, ops_datasets, ops_training
from fetchml.protocol.job import SUBMIT_FIELDS_DOC, WIRE_JOB_DOC
from fetchml.protocol.schema import Arg, NoArgs, OpSpec, in_range, non_negative

# 2: jobs say "gpus" (how many) and "gpu_ids" (which), "retries" as submit does. A protocol-1
# session still gets jobs in protocol 1's spelling (fetchml.protocol.job.job_v1).
PROTOCOL_VERSION = 2
MIN_PROTOCOL_VERSION = 1

class HelloArgs(TypedDict):
    protocol: int
    client: str


HELLO = OpSpec(
    "hello",
    "Opens the session; must be the first request. The daemon answers with the protocol version "
    "both sides speak (the lower of the two) or refuses with bad_request and closes.",
    args=(
        Arg("protocol", int, "the highest protocol version the client speaks", required=True),
        Arg("client", str, "client name and version, e.g. fetchml/0.1.0", default=""),
    ),
    result='{"protocol", "daemon", "user", "role", "host": {"name", "cpus", "memory", "gpus"}}',
    params=HelloArgs, permissions=(),
)


class StreamCancelArgs(TypedDict):
    target: int


STREAM_CANCEL = OpSpec(
    "stream.cancel",
    "Ends a stream this connection opened; the stream's final reply is "
    '{"ok": true, "result": {"cancelled": true}}.',
    args=(Arg("target", int, "the id of the stream request to end", required=True),),
    result='{"cancelled": bool} (false when the target was not a running stream)',
    params=StreamCancelArgs, permissions=(),
)

HOST_INFO = OpSpec(
    "host.info",
    "Who you are, the daemon's version, and this host's resources and their use.",
    result='{"protocol", "daemon", "user", "role", "host": {...}, "free": {"cpus", "memory", '
    '"gpus": [index]}, "jobs": {state: count}}',
    params=NoArgs, permissions=("host:read",),
)

HOST_PING = OpSpec(
    "host.ping", "Answers at once; for latency checks.", result='{"time": float}',
    params=NoArgs, permissions=(),
)


class HostMonitorArgs(TypedDict):
    interval: float


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
    params=HostMonitorArgs, permissions=("host:read",),
)


class CasMissingArgs(TypedDict):
    oids: list[str]


CAS_MISSING = OpSpec(
    "cas.missing",
    "Which of these objects the daemon lacks (send at most 100,000 per call).",
    args=(Arg("oids", list, "object ids (64 hex)", required=True, items=str),),
    result='{"missing": [oid]} in the order given',
    params=CasMissingArgs, permissions=("cas:write",),
)


class CasPutArgs(TypedDict):
    blobs: list[dict[str, Any]]  # {oid, size, offset, data}


CAS_PUT = OpSpec(
    "cas.put",
    "Uploads object bytes. Each blob is one chunk of one object: "
    '{"oid", "size" (whole object), "offset", "data" (bin)}; an object larger than one chunk is '
    "sent as consecutive chunks, in order, on the same connection. Small objects are batched "
    "several to a frame. An object is stored once its last chunk arrives and its digest matches. "
    "Requests are processed in the order they arrive, so clients pipeline them freely.",
    args=(Arg("blobs", list, "chunks, at most 4 MiB of data in all", required=True, items=dict),),
    result='{"stored": [oid]} objects completed by this request',
    params=CasPutArgs, permissions=("cas:write",), ordered=True,
)


class CasGetArgs(TypedDict):
    oid: str


CAS_GET = OpSpec(
    "cas.get",
    "Downloads an object in chunks; the daemon verifies the digest and ends with integrity "
    "instead of ok when the stored bytes are damaged.",
    args=(Arg("oid", str, "object id", required=True),),
    stream=True,
    events='"chunk": bin (at most 4 MiB)',
    result='{"oid", "size"}',
    params=CasGetArgs, permissions=("cas:read",),
)


class SnapshotPutArgs(TypedDict):
    manifest: bytes | None
    base: str | None
    upsert: list[list[Any]] | None
    remove: list[str] | None
    expect: str | None


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
    params=SnapshotPutArgs, permissions=("cas:write",),
)


class SnapshotArgs(TypedDict):
    snapshot: str


SNAPSHOT_GET = OpSpec(
    "snapshot.get",
    "Returns a stored manifest; accepts any unique prefix of at least 6 hex digits.",
    args=(Arg("snapshot", str, "snapshot id or unique prefix", required=True),),
    result='{"snapshot", "manifest": bin, "files", "bytes"}',
    params=SnapshotArgs, permissions=("cas:read",),
)

class JobsSubmitArgs(TypedDict):
    snapshot: str
    jobs: list[dict[str, Any]]  # each a JobSubmission, checked field by field
    supersede: dict[str, str] | None


JOBS_SUBMIT = OpSpec(
    "jobs.submit",
    "Queues one job or many (a sweep) on a stored snapshot, atomically; acknowledged only once "
    "durable.",
    args=(
        Arg("snapshot", str, "snapshot id or unique prefix", required=True),
        Arg("jobs", list, f"job specs, each {SUBMIT_FIELDS_DOC}", required=True, items=dict),
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
    params=JobsSubmitArgs, permissions=("jobs:create",), audited=True, rate_limited=True,
)


class JobsListArgs(TypedDict):
    states: list[str] | None
    owner: str | None
    all_users: bool
    limit: int
    before: int | None


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
    params=JobsListArgs, permissions=("jobs:read",),
)


class JobArgs(TypedDict):
    job: str


JOBS_GET = OpSpec(
    "jobs.get",
    "One job in detail.",
    args=(Arg("job", str, "job id", required=True),),
    result="job",
    params=JobArgs, permissions=("jobs:read",),
)


class JobsCancelArgs(TypedDict):
    jobs: list[str]
    reason: str


JOBS_CANCEL = OpSpec(
    "jobs.cancel",
    "Cancels queued, held or running jobs (running: TERM to the process group, a grace period, "
    "then KILL).",
    args=(
        Arg("jobs", list, "job ids", required=True, items=str),
        Arg("reason", str, "recorded with the job", default=""),
    ),
    result='{"jobs": [job]}',
    params=JobsCancelArgs, permissions=("jobs:cancel",), audited=True,
)


OUTPUTS_STORE = OpSpec(
    "outputs.store",
    "Stores the outputs a job left in its run directory because they could not be stored "
    "when it ended (the disk was full, the attempt was lost); the job keeps its state. The "
    "owner's jobs, or anyone's with admin:prune.",
    args=(Arg("job", str, "job id", required=True),),
    result='{"job": job, "stored": bool (false: they were stored already)}',
    params=JobArgs, permissions=("jobs:read", "cas:write"), audited=True,
)


class JobsWaitArgs(TypedDict):
    jobs: list[str]
    timeout: float | None


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
    params=JobsWaitArgs, permissions=("jobs:read",),
)


class JobsLogsArgs(TypedDict):
    job: str
    attempt: int | None
    offset: int
    follow: bool


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
    params=JobsLogsArgs, permissions=("jobs:read",),
)


class JobsEventsArgs(TypedDict):
    jobs: list[str] | None


JOBS_EVENTS = OpSpec(
    "jobs.events",
    "Every state change of the jobs you may see, as it happens, until cancelled.",
    args=(Arg("jobs", list, "only these job ids", default=None, items=str, nullable=True),),
    stream=True,
    events='"job": job',
    result='{"cancelled": true}',
    params=JobsEventsArgs, permissions=("jobs:read",),
)


class AdminFsckArgs(TypedDict):
    read_data: bool


ADMIN_FSCK = OpSpec(
    "admin.fsck",
    "Checks the object store: with read_data every object is re-hashed.",
    args=(Arg("read_data", bool, "re-hash every object", default=False),),
    result='{"objects", "snapshots", "problems": [{"kind", "oid", "message"}]}',
    params=AdminFsckArgs, permissions=("admin:fsck",),
)


class AdminUsersAddArgs(TypedDict):
    name: str
    role: str
    uid: int | None


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
    params=AdminUsersAddArgs, permissions=("admin:users",), audited=True,
)

ADMIN_USERS_LIST = OpSpec(
    "admin.users.list",
    "Every user, from the config and added at run time (never keys or their hashes).",
    result='{"users": [{"name", "role", "uid", "has_key", "created_at", "revoked_at", '
    '"source"}]}',
    params=NoArgs, permissions=("admin:users",),
)


class AdminUsersRevokeArgs(TypedDict):
    name: str


ADMIN_USERS_REVOKE = OpSpec(
    "admin.users.revoke",
    "Revokes a user's key; their open sessions are refused at their next request.",
    args=(Arg("name", str, "user name", required=True),),
    result='{"name", "revoked_at"}',
    params=AdminUsersRevokeArgs, permissions=("admin:users",), audited=True,
)


class AdminAuditArgs(TypedDict):
    verify: bool
    tail: int


ADMIN_AUDIT = OpSpec(
    "admin.audit",
    "Checks the audit log's hash chain, or returns its last entries.",
    args=(
        Arg("verify", bool, "check the whole chain", default=False),
        Arg("tail", int, "how many recent entries to return", default=20,
            check=in_range(0, 10_000)),
    ),
    result='{"ok", "lines", "files", "bad_file", "bad_line", "reason", "entries": [...]}',
    params=AdminAuditArgs, permissions=("admin:audit",),
)


class AdminPruneArgs(TypedDict):
    older_than: float | None
    keep: int | None
    states: list[str] | None
    user: str | None
    all_users: bool
    gc_grace: float | None
    collect: bool
    dry_run: bool


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
    params=AdminPruneArgs, permissions=("jobs:prune",), audited=True,
)

SNAPSHOT_PIN = OpSpec(
    "snapshot.pin",
    "Keeps a snapshot (and every object it names) from garbage collection.",
    args=(Arg("snapshot", str, "snapshot id or unique prefix", required=True),),
    result='{"snapshot"}',
    params=SnapshotArgs, permissions=("cas:write",),
)

SNAPSHOT_UNPIN = OpSpec(
    "snapshot.unpin",
    "Removes your pin of a snapshot (an admin's removes every pin of it); once no pin is left, "
    "garbage collection treats it like any other again.",
    args=(Arg("snapshot", str, "snapshot id or unique prefix", required=True),),
    result='{"snapshot", "by": [user]} (whose pins were removed)',
    params=SnapshotArgs, permissions=("cas:write",),
)

SNAPSHOT_PINS = OpSpec(
    "snapshot.pins",
    "Your pins (an admin sees everyone's), one entry per snapshot and user.",
    result='{"pins": [{"snapshot", "by"}]}',
    params=NoArgs, permissions=("cas:read",),
)

# Ops of optional subsystems live in modules of their own.
_GROUPS = (*ops_cluster.OPS, *ops_datasets.OPS, *ops_training.OPS)

CATALOGUE: dict[str, OpSpec[Any]] = {
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
        OUTPUTS_STORE,
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


# Ops the session answers itself, before and beside the handlers: the handshake and the end of
# a stream. Every other op of the catalogue has a handler.
CONNECTION_OPS = frozenset({HELLO.name, STREAM_CANCEL.name})


def describe() -> str:
    """The whole catalogue as text, after the shape of a job."""
    job = f"job (in results and events): {WIRE_JOB_DOC}"
    return "\n\n".join([job, *(spec.describe() for spec in CATALOGUE.values())])
