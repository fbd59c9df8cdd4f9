"""The dashboard's view of the daemon: streams read in background threads, handed on as events.

Nothing here polls: the job list is read once, then kept up to date by ``jobs.events``; the
host's free resources come from ``host.monitor``; the watched job's output and metrics from
``jobs.logs`` and ``jobs.metrics`` with follow. When the connection drops, the session thread
connects again every RECONNECT_S and starts everything over. ``post`` is called from those
threads (the app hands each event to its own loop).
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fetchml.client import Connection, Pending
from fetchml.errors import FetchmlError, PermissionDenied, Unavailable
from fetchml.protocol import ops, ops_training

log = logging.getLogger(__name__)

RECONNECT_S = 2.0  # wait between attempts to reach a daemon that went away
LIST_LIMIT = 500  # jobs read when the dashboard (re)connects; events add the rest
MONITOR_INTERVAL_S = 1.0  # host.monitor period: GPUs and free resources
METRICS_POINTS = 2000  # points per series asked for when a job is selected


@dataclass(frozen=True)
class Connected:
    hello: dict[str, Any]


@dataclass(frozen=True)
class Disconnected:
    message: str


@dataclass(frozen=True)
class JobsListed:
    jobs: list[dict[str, Any]]
    all_users: bool


@dataclass(frozen=True)
class JobChanged:
    job: dict[str, Any]


@dataclass(frozen=True)
class HostStatus:
    status: dict[str, Any]  # host.info's result, or a host.monitor event


@dataclass(frozen=True)
class LogText:
    watch: int  # which selection it belongs to: older ones are dropped
    text: str
    reset: bool = False  # a new attempt began: clear what was shown


@dataclass(frozen=True)
class MetricsUpdate:
    watch: int
    data: dict[str, Any]  # a jobs.metrics event


FeedEvent = (Connected | Disconnected | JobsListed | JobChanged | HostStatus | LogText
             | MetricsUpdate)
Post = Callable[[FeedEvent], None]


class DaemonFeeds:
    """Keeps the dashboard's streams open on one connection, and reconnects."""

    def __init__(self, connect: Callable[[], Connection], post: Post, *,
                 all_users: bool = True) -> None:
        self._connect, self._post = connect, post
        self.all_users = all_users  # wanted; falls back to own jobs when not allowed
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._conn: Connection | None = None
        self._watch_id = 0
        self._watched: int | None = None
        self._watch_streams: list[Pending] = []
        self._session = threading.Thread(target=self._run_session, name="tui-session",
                                         daemon=True)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._session.start()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _emit(self, event: FeedEvent) -> bool:
        """Hand an event to the app; False once the app is gone."""
        if self._stopped.is_set():
            return False
        try:
            self._post(event)
        except Exception:  # the app closed under a reader thread: nothing left to tell
            log.debug("dashboard gone; dropping %s", type(event).__name__)
            self._stopped.set()
            return False
        return True

    def _run_session(self) -> None:
        while not self._stopped.is_set():
            try:
                conn = self._connect()
            except FetchmlError as exc:
                self._emit(Disconnected(exc.message))
                self._stopped.wait(RECONNECT_S)
                continue
            with self._lock:
                if self._stopped.is_set():  # stopped while connecting
                    conn.close()
                    return
                self._conn = conn
            try:
                self._serve(conn)
            except FetchmlError as exc:
                if self._stopped.is_set():
                    return
                self._emit(Disconnected(exc.message))
            with self._lock:
                if self._conn is conn:
                    self._conn = None
            conn.close()
            self._stopped.wait(RECONNECT_S)

    def _serve(self, conn: Connection) -> None:
        """Read the job list, then follow job changes until the connection ends."""
        if not self._emit(Connected(conn.hello)):
            return
        events = conn.stream(ops.JOBS_EVENTS.name, {})  # before the list: no change slips between
        self._emit(HostStatus(conn.call(ops.HOST_INFO.name)))
        monitor = conn.stream(ops.HOST_MONITOR.name, {"interval": MONITOR_INTERVAL_S})
        threading.Thread(target=self._read_monitor, args=(monitor,), name="tui-monitor",
                         daemon=True).start()
        self.refresh(conn)
        with self._lock:
            watched = self._watched
        if watched is not None:  # again, on this connection
            self.open_watch(self.begin_watch(watched))
        for event in events.events():
            if event.event == "job" and not self._emit(JobChanged(event.data)):
                return

    def refresh(self, conn: Connection | None = None) -> None:
        """Read the job list again (after the scope changed)."""
        conn = conn or self._conn
        if conn is None:
            return
        all_users = self.all_users
        try:
            jobs = conn.call(ops.JOBS_LIST.name, {"all_users": all_users, "limit": LIST_LIMIT})
        except PermissionDenied:
            all_users = self.all_users = False
            jobs = conn.call(ops.JOBS_LIST.name, {"limit": LIST_LIMIT})
        self._emit(JobsListed(jobs["jobs"], all_users))

    def _read_monitor(self, monitor: Pending) -> None:
        try:
            for event in monitor.events():
                if event.event == "host" and not self._emit(HostStatus(event.data)):
                    return
        except FetchmlError as exc:
            log.debug("host monitor ended: %s", exc)

    # -- the watched job --------------------------------------------------------------------
    @property
    def watch_id(self) -> int:
        """The id carried by the events of the job watched now; other events are stale."""
        return self._watch_id

    def begin_watch(self, job_id: int | None) -> int:
        """Watch this job (None: none) from now on: events of the one before are stale at
        once. Its streams are opened by ``open_watch`` (blocking)."""
        with self._lock:
            self._watch_id += 1
            self._watched = job_id
            return self._watch_id

    def open_watch(self, watch_id: int) -> None:
        """End the streams of the job watched before and open the watched job's output and
        metrics streams, unless another job was chosen meanwhile (blocking)."""
        with self._lock:
            if watch_id != self._watch_id:
                return
            job_id, conn = self._watched, self._conn
            old, self._watch_streams = self._watch_streams, []
        for stream in old:
            with contextlib.suppress(FetchmlError):  # else its connection is gone, streams too
                stream.conn.send(ops.STREAM_CANCEL.name, {"target": stream.id})
        if job_id is None or conn is None:
            return
        try:
            logs = conn.stream(ops.JOBS_LOGS.name, {"job": str(job_id), "follow": True})
            metrics = conn.stream(ops_training.JOBS_METRICS.name,
                                  {"jobs": [str(job_id)], "follow": True,
                                   "max_points": METRICS_POINTS})
        except FetchmlError as exc:
            self._emit(Disconnected(exc.message))
            return
        with self._lock:
            self._watch_streams.extend((logs, metrics))
        threading.Thread(target=self._read_logs, args=(logs, watch_id), name="tui-logs",
                         daemon=True).start()
        threading.Thread(target=self._read_metrics, args=(metrics, watch_id),
                         name="tui-metrics", daemon=True).start()

    def _current(self, watch_id: int) -> bool:
        return watch_id == self._watch_id and not self._stopped.is_set()

    def _read_logs(self, stream: Pending, watch_id: int) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        first = True  # the output starts over: what was shown before goes
        try:
            for event in stream.events():
                if not self._current(watch_id):
                    continue  # cancelled; its final reply is on the way
                if event.event == "attempt":
                    decoder.reset()
                    self._emit(LogText(watch_id, f"-- attempt {event.data} --\n", reset=True))
                elif event.event == "log":
                    self._emit(LogText(watch_id, decoder.decode(event.data), reset=first))
                first = False
        except FetchmlError as exc:
            log.debug("log stream ended: %s", exc)

    def _read_metrics(self, stream: Pending, watch_id: int) -> None:
        try:
            for event in stream.events():
                if self._current(watch_id) and event.event == "metrics":
                    self._emit(MetricsUpdate(watch_id, event.data))
        except FetchmlError as exc:
            log.debug("metrics stream ended: %s", exc)

    # -- actions ----------------------------------------------------------------------------
    def call(self, op: str, args: dict[str, Any]) -> Any:
        """One request on the dashboard's connection (blocking: call it from a worker)."""
        conn = self._conn
        if conn is None:
            raise Unavailable("not connected to the daemon; wait until it is back")
        return conn.call(op, args)

    @property
    def connection(self) -> Connection | None:
        return self._conn
