"""fetchml watch: sync the project on every save; with a command, re-queue it on each new
snapshot, superseding the stale queued job."""

from __future__ import annotations

import contextlib
import secrets
import time
from pathlib import Path
from typing import Any

import click

from fetchml.cas import delta
from fetchml.cas.manifest import SnapshotManifest
from fetchml.cli.context import CliContext, json_option, pass_cli
from fetchml.cli.queue_cmd import build_jobs, queue_options
from fetchml.cli.sync_cmd import describe, project_root
from fetchml.client.connection import Connection
from fetchml.client.mirror import TreeMirror
from fetchml.client.transfer import SyncReport, find_missing, upload
from fetchml.client.watcher import Batch, ChangeWatcher
from fetchml.config import parse_duration
from fetchml.errors import (
    BadRequest,
    FetchmlError,
    IntegrityError,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from fetchml.protocol import ops
from fetchml.protocol.job import JobSubmission

# First wait before reconnecting to a daemon that went away; doubled up to RECONNECT_MAX_S.
RECONNECT_FIRST_S = 0.2
RECONNECT_MAX_S = 10.0
# After a sync failed on a file (changed while read, unreadable), try once more this much later.
ERROR_RETRY_S = 1.0
# An idle wait for events ends this often to look after reconnects and retries.
IDLE_WAIT_S = 60.0
# Caps inotify watches (for file systems or tests where the real limit cannot be set).
WATCH_LIMIT_ENV = "FETCHML_WATCH_LIMIT"
# Errors no retry can fix: the watch ends with them.
FATAL = (Unauthenticated, PermissionDenied, NotFound)


class WatchLoop:
    """One `fetchml watch` run: keeps the mirror current, syncs each burst, queues jobs."""

    def __init__(self, cli: CliContext, root: Path, *, debounce: float, events: ChangeWatcher,
                 jobs: list[JobSubmission] | None, watch_id: str, restart: bool) -> None:
        self.cli, self.debounce, self.events = cli, debounce, events
        self.mirror = TreeMirror(root, max_file_size=cli.settings.max_file_size)
        self.jobs, self.watch_id, self.restart = jobs, watch_id, restart
        self.conn: Connection | None = None
        self.known: set[str] = set()  # oids this daemon is known to hold
        self.sent_ahead = (0, 0)  # (files, bytes) uploaded while bursts settled, not reported
        self.base: tuple[str, SnapshotManifest] | None = None  # the last snapshot stored
        self.queued_snapshot: str | None = None
        self.last_jobs: list[str] = []
        self.retry_at: float | None = None
        self.reconnect_delay: float | None = None  # set while the daemon is unreachable
        self.failed_on_files = False

    def run(self) -> None:
        self.sync(first=True)
        while True:
            due = [t for t in (self.retry_at, self.events.settled_at) if t is not None]
            wait = min(due) - time.monotonic() if due else IDLE_WAIT_S
            batch = self.events.wait(max(wait, 0.001))
            if batch is not None:
                burst = self.events.collect(batch, self.debounce, self.on_batch)
                if burst.lost:
                    self.mirror.needs_full_scan = True
                self.sync()
                continue
            now = time.monotonic()
            if self.events.settled_at is not None and now >= self.events.settled_at:
                self.events.settled_at = None
                self.mirror.needs_full_scan = True  # what a new poller missed
                self.sync()
            elif self.retry_at is not None and now >= self.retry_at:
                self.sync()

    def on_batch(self, batch: Batch) -> None:
        """Read what changed while the burst is still settling, so the sync has little left."""
        if batch.lost:
            self.mirror.needs_full_scan = True
            return
        try:
            self.mirror.apply(batch.paths)
            if not self.mirror.needs_full_scan:
                _ = self.mirror.manifest
                self.upload_ahead()
        except FetchmlError:
            self.mirror.needs_full_scan = True  # the scan at the end reports it properly

    def full_scan(self) -> None:
        """Watch the directories the scan keeps (listing them again), then scan: the watch
        is in place first, so nothing changed during the scan goes unseen."""
        self.mirror.reload_rules()
        self.events.watch(self.mirror.watch_dirs())
        self.mirror.rescan()

    # -- one sync -----------------------------------------------------------------------------
    def sync(self, *, first: bool = False) -> None:
        try:
            if self.mirror.needs_full_scan:
                self.full_scan()
            changed = self.mirror.changed_paths()
            if not changed and not first and self.retry_at is None:
                return  # the burst left the snapshot as it was
            report = self.send(self.mirror.manifest, first=first)
        except FATAL:
            raise
        except (Unavailable, RateLimited) as exc:
            if first:
                raise
            self.daemon_lost(exc)
            return
        except FetchmlError as exc:  # a file changed while read, or cannot be kept
            self.cli.note(f"error: {exc.message}")
            self.mirror.needs_full_scan = True
            retry = not self.failed_on_files
            self.failed_on_files = True
            self.retry_at = time.monotonic() + ERROR_RETRY_S if retry else None
            return
        try:
            jobs = self.queue(report.snapshot)
        except (Unavailable, RateLimited) as exc:
            if first:
                raise
            self.daemon_lost(exc)  # the retry stores the same snapshot again, then queues
            return
        # Any other refusal of the job (it can never fit, say) ends the watch with it.
        if self.reconnect_delay is not None:
            self.cli.note("reconnected to the daemon")
        self.retry_at = self.reconnect_delay = None
        self.failed_on_files = False
        self.mirror.mark_synced()
        self.emit(report, len(changed), jobs)

    def connection(self) -> Connection:
        if self.conn is None:
            self.conn = self.cli.connect()
            self.known.clear()
        return self.conn

    def send(self, manifest: SnapshotManifest, *, first: bool) -> SyncReport:
        """Upload what the daemon lacks and store the snapshot; a connection that had
        gone stale (the daemon restarted, or closed it while idle) is replaced once."""
        hashed = self.mirror.hashed_files
        for attempt in (1, 2):
            reused = self.conn is not None
            try:
                sent_files, sent_bytes, snapshot = self.put(self.connection(), manifest)
                sent_files, sent_bytes = (sent_files + self.sent_ahead[0],
                                          sent_bytes + self.sent_ahead[1])
                self.sent_ahead = (0, 0)
                break
            except Unavailable:
                self.drop_connection()
                if first or not reused or attempt == 2:
                    raise
        return SyncReport(snapshot, manifest.file_count, manifest.total_bytes, sent_files,
                          sent_bytes, hashed)

    def put(self, conn: Connection, manifest: SnapshotManifest) -> tuple[int, int, str]:
        sent_files = sent_bytes = 0
        for attempt in range(3):
            args = self.put_args(manifest)
            files, sent = self.put_objects(conn, _objects_to_check(manifest, args))
            sent_files, sent_bytes = sent_files + files, sent_bytes + sent
            try:
                result = conn.call(ops.SNAPSHOT_PUT.name, args)
            except (NotFound, BadRequest):  # the base was collected, or the delta refused
                if self.base is None:
                    raise
                self.base = None
                continue
            except IntegrityError:  # objects it held were collected since: ask again
                if attempt == 2:
                    raise
                self.known.clear()
                continue
            self.base = (str(result["snapshot"]), manifest)
            return sent_files, sent_bytes, str(result["snapshot"])
        raise AssertionError("unreachable: the third attempt returns or raises")

    def put_objects(self, conn: Connection, sizes: dict[str, int]) -> tuple[int, int]:
        """Upload the objects of ``sizes`` the daemon lacks: (files, bytes) sent."""
        unknown = sorted(oid for oid in sizes if oid not in self.known)
        missing = find_missing(conn, unknown) if unknown else []
        sent = upload(conn, missing, {oid: self.mirror.source(oid) for oid in missing}, sizes)
        self.known.update(unknown)
        return len(missing), sent

    def upload_ahead(self) -> None:
        """Send the changed files' objects while the burst settles, so that the sync after
        it has only the manifest left to store. A failure here is the sync's to report."""
        if self.conn is not None:
            with contextlib.suppress(FetchmlError):
                files, sent = self.put_objects(self.conn, self.mirror.changed_objects(self.known))
                self.sent_ahead = (self.sent_ahead[0] + files, self.sent_ahead[1] + sent)

    def put_args(self, manifest: SnapshotManifest) -> dict[str, Any]:
        """The whole manifest, or only its changes from the last one stored (so the daemon
        checks one entry, not the whole tree, after a single edit)."""
        if self.base is not None:
            base_id, base = self.base
            upsert, remove = delta.diff(base, manifest)
            if delta.worth_sending(base, upsert, remove):
                return {"base": base_id, "upsert": upsert, "remove": remove,
                        "expect": manifest.snapshot_id}
        return {"manifest": manifest.encode()}

    def queue(self, snapshot: str) -> list[dict[str, Any]] | None:
        """Submit the command on a new snapshot; the daemon cancels this watch's stale
        queued job in the same step, and --restart cancels a running one too."""
        if self.jobs is None or snapshot == self.queued_snapshot:
            return None
        conn = self.connection()
        if self.restart and self.last_jobs:
            with contextlib.suppress(NotFound):  # pruned meanwhile: nothing left to stop
                conn.call(ops.JOBS_CANCEL.name, {"jobs": self.last_jobs, "reason": "superseded"})
        submitted = conn.call(ops.JOBS_SUBMIT.name, {"snapshot": snapshot, "jobs": self.jobs,
                                                     "supersede": {"watch": self.watch_id}})["jobs"]
        self.queued_snapshot = snapshot
        self.last_jobs = [str(job["id"]) for job in submitted]
        return [{"id": j["id"], "name": j["name"], "state": j["state"]} for j in submitted]

    def daemon_lost(self, exc: FetchmlError) -> None:
        self.drop_connection()
        if isinstance(exc, RateLimited):
            delay = exc.retry_after
        elif self.reconnect_delay is None:
            self.cli.note(f"cannot sync: {exc.message}")
            self.cli.note("retrying in the background; changes keep being recorded")
            delay = RECONNECT_FIRST_S
        else:
            delay = min(self.reconnect_delay * 2, RECONNECT_MAX_S)
        self.reconnect_delay = delay
        self.retry_at = time.monotonic() + delay

    def drop_connection(self) -> None:
        self.conn = None
        self.cli.close()

    def emit(self, report: SyncReport, changed: int, jobs: list[dict[str, Any]] | None) -> None:
        if self.cli.as_json:
            line: dict[str, Any] = {**report.to_json(), "changed": changed,
                                    "hashed_files": report.hashed_files}
            if jobs is not None:
                line["jobs"] = jobs
            self.cli.emit_json(line)
            return
        self.cli.say(f"{time.strftime('%H:%M:%S')}  {describe(report)}; {changed} changed")
        for job in jobs or []:
            self.cli.say(f"          queued job {job['id']}  {job['name']}  ({job['state']})")

    def close(self) -> None:
        self.events.close()
        self.mirror.cache.save()


class _SplitAtDashes(click.Command):
    """Takes everything after ``--`` as the command, so PATH and CMD never mix."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            at = args.index("--")
            ctx.meta["fetchml.watch.command"] = args[at + 1:]
            args = args[:at]
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return [*super().collect_usage_pieces(ctx), "[-- CMD...]"]


def _watch_limit(cli: CliContext) -> int | None:
    text = cli.env.get(WATCH_LIMIT_ENV)
    if not text:
        return None
    if not text.isdigit():
        raise click.UsageError(f"{WATCH_LIMIT_ENV}={text!r} is not a whole number of watches")
    return int(text)


@click.command(cls=_SplitAtDashes)
@click.argument("path", required=False, type=click.Path(exists=True, file_okay=False,
                                                         path_type=Path))
@queue_options
@click.option("--restart", is_flag=True,
              help="Also cancel this watch's running job when a newer snapshot is queued.")
@click.option("--debounce", metavar="DURATION",
              help="Quiet time before a burst of changes syncs (default: the debounce "
                   "setting, 200ms).")
@click.option("--poll", is_flag=True, help="Poll for changes instead of using inotify.")
@json_option
@pass_cli
def watch(cli: CliContext, /, path: Path | None, restart: bool, debounce: str | None,
          poll: bool, **options: Any) -> None:
    """Sync PATH (default: the project) on every change; with `-- CMD...`, queue CMD on
    each new snapshot."""
    command: list[str] = click.get_current_context().meta.get("fetchml.watch.command", [])
    watch_id = secrets.token_hex(6)
    jobs = None
    if command:
        jobs = build_jobs(command, **options, labels={"watch": watch_id})
    elif restart or any(value not in (None, (), False) for value in options.values()):
        raise click.UsageError("--restart and the queue options need a command after --, "
                               "e.g. fetchml watch --gpus 1 -- python train.py")
    try:
        quiet = cli.settings.debounce if debounce is None else parse_duration(debounce)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--debounce") from exc
    events = ChangeWatcher(force_polling=poll, watch_limit=_watch_limit(cli))
    loop = WatchLoop(cli, project_root(cli, path), debounce=quiet, events=events, jobs=jobs,
                     watch_id=watch_id, restart=restart)
    try:
        loop.run()
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
    cli.note("stopped watching")
    raise SystemExit(130)


def _objects_to_check(manifest: SnapshotManifest, args: dict[str, Any]) -> dict[str, int]:
    """The objects (oid -> size) a snapshot.put with ``args`` may find missing: a delta's base
    is stored with all its objects, so only the changed entries' objects can be new."""
    if "upsert" in args:
        return {row[4].hex(): row[3] for row in args["upsert"] if row[4] is not None}
    return {e.oid: e.size for e in manifest.entries if e.oid is not None}
