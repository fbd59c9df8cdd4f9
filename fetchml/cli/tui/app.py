"""The dashboard: jobs (live, sortable, filtered), GPUs, the selected job's details, output
and metrics plot; keys to cancel (asks first), re-queue and pull outputs.

It acts through the same connection and permissions as the CLI: what the daemon refuses is
shown as a notification. Narrow terminals lose the side pane and stack the plot under the log.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.notifications import SeverityLevel
from textual.widgets import DataTable, Footer, Static

from fetchml.cli.tui.feeds import (
    Connected,
    DaemonFeeds,
    Disconnected,
    FeedEvent,
    HostStatus,
    JobChanged,
    JobsListed,
    LogText,
    MetricsUpdate,
)
from fetchml.cli.tui.model import (
    COLUMNS,
    FINISHED,
    JobBoard,
    detail_rows,
    gpu_rows,
    requeue_spec,
    table_cells,
)
from fetchml.cli.tui.plot import WatchedMetrics
from fetchml.cli.tui.widgets import ConfirmScreen, LogPane, MetricsPlot, PromptScreen
from fetchml.client import Connection
from fetchml.errors import FetchmlError
from fetchml.protocol import ops

NARROW_BELOW = 70  # columns under which the side pane goes and the plot moves under the log
TABLE_DEBOUNCE_S = 0.05  # a burst of job changes redraws the table once
CLOCK_S = 1.0  # running jobs' times tick this often (drawn again, not asked again)
TOLD_KEPT = 20  # notifications remembered (for a look back, and tests)
SORTABLE = {"id": "id", "name": "name", "owner": "owner", "state": "state", "pri": "priority"}


class Dashboard(App[None]):
    TITLE = "fetchml"
    # Textual declares this without ClassVar, so it cannot be annotated as one here
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (NARROW_BELOW, "-wide")]  # noqa: RUF012
    CSS = """
    #status { height: 1; background: $primary-background; padding: 0 1; }
    #top { height: 1fr; }
    #jobs { width: 1fr; }
    #side { width: 30; border-left: vkey $primary-darken-2; }
    #gpus { height: auto; max-height: 7; color: $text-muted; }
    #details { height: 1fr; }
    #bottom { height: 1fr; border-top: hkey $primary-darken-2; }
    #logbox { width: 1fr; }
    #logtitle { height: 1; color: $text-muted; }
    #log { height: 1fr; }
    #plot { width: 45%; border-left: vkey $primary-darken-2; }
    Screen.-narrow #side { display: none; }
    Screen.-narrow #bottom { layout: vertical; }
    Screen.-narrow #plot { width: 100%; height: 40%; border-left: none; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("c", "cancel_job", "cancel"),
        Binding("r", "requeue", "re-queue"),
        Binding("p", "pull", "pull"),
        Binding("s", "cycle_state", "state"),
        Binding("u", "filter_user", "user"),
        Binding("a", "toggle_scope", "all/mine"),
        Binding("o", "cycle_sort", "sort"),
        Binding("slash", "search", "search"),
        Binding("n", "next_match(1)", "next", show=False),
        Binding("N", "next_match(-1)", "previous", show=False),
        Binding("f", "toggle_follow", "follow"),
        Binding("m", "next_metric", "metric"),
    ]

    def __init__(self, connect: Callable[[], Connection], *, pull_dir: Path,
                 all_users: bool = True) -> None:
        super().__init__()
        self.board = JobBoard()
        self.feeds = DaemonFeeds(connect, self._post, all_users=all_users)
        self.pull_dir = pull_dir
        self.hello: dict[str, Any] = {}
        self.host: dict[str, Any] = {}
        self.free: dict[str, Any] = {}
        self.problem: str | None = None
        self.told: deque[tuple[SeverityLevel, str]] = deque(maxlen=TOLD_KEPT)
        self.selected: int | None = None
        self._table_due = False
        self.metrics = WatchedMetrics()

    # -- layout -----------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        # Held here, not looked up: while a dialog is open, queries reach only the dialog.
        self.table: DataTable[str] = DataTable(id="jobs", cursor_type="row")
        self.log_pane = LogPane(id="log")
        self.plot = MetricsPlot(self.metrics, id="plot")
        self.panes = {name: Static(id=name) for name in ("status", "gpus", "detail",
                                                         "logtitle")}
        yield self.panes["status"]
        with Horizontal(id="top"):
            yield self.table
            with Vertical(id="side"):
                yield self.panes["gpus"]
                with VerticalScroll(id="details"):
                    yield self.panes["detail"]
        with Horizontal(id="bottom"):
            with Vertical(id="logbox"):
                yield self.panes["logtitle"]
                yield self.log_pane
            yield self.plot
        yield Footer()

    def on_unmount(self) -> None:
        """However the app ends (quit, an error, a test leaving it), its reader threads stop."""
        self.feeds.stop()

    def on_mount(self) -> None:
        for header in COLUMNS:
            self.table.add_column(header, key=header)
        self.set_interval(CLOCK_S, self._tick)
        self._show_status()
        self._show_log_title()
        self.feeds.start()

    @property
    def drawable(self) -> bool:
        """Whether the panes are on screen (not yet, or no longer, while starting or ending)."""
        return self.table.is_attached

    # -- events from the daemon -------------------------------------------------------------
    def _post(self, event: FeedEvent) -> None:
        """From the feed threads: handled on the app's loop, in order."""
        self.call_from_thread(self.on_feed, event)

    def on_feed(self, event: FeedEvent) -> None:
        if not self.drawable:
            return
        if isinstance(event, JobChanged):
            self.board.update(event.job)
            self._table_soon()
            if event.job["id"] == self.selected:
                self._show_details()
        elif isinstance(event, LogText):
            if event.watch == self.feeds.watch_id:
                if event.reset:
                    self.log_pane.clear()
                self.log_pane.append(event.text)
        elif isinstance(event, MetricsUpdate):
            if event.watch == self.feeds.watch_id:
                self.metrics.apply(event.data)
                self.plot.refresh()
                self._show_details()
        elif isinstance(event, HostStatus):
            self.host = event.status.get("host", self.host)
            self.free = event.status.get("free", self.free)
            self._show_gpus()
        elif isinstance(event, JobsListed):
            self.board.replace(event.jobs)
            self.feeds.all_users = event.all_users
            self._redraw_table()
            self._show_status()
        elif isinstance(event, Connected):
            self.hello, self.problem = event.hello, None
            self._show_status()
        elif isinstance(event, Disconnected):
            self.problem = event.message
            self._show_status()

    # -- drawing ----------------------------------------------------------------------------
    def _show_status(self) -> None:
        if self.problem:
            text = f"[b red]disconnected[/]: {self.problem} (trying again)"
        else:
            who = (f"{self.hello.get('user', '?')} ({self.hello.get('role', '?')})"
                   if self.hello else "connecting")
            scope = "everyone's jobs" if self.feeds.all_users else "my jobs"
            user = f" of {self.board.user}" if self.board.user else ""
            order = "↓" if self.board.descending else "↑"
            host = self.host.get("name") or self.hello.get("host", {}).get("name", "")
            text = (f"[b]fetchml[/] {host} · {who} · {scope}{user} · {self.board.state_label}"
                    f" · sort {self.board.sort_key}{order}")
        self.panes["status"].update(text)

    def _table_soon(self) -> None:
        if not self._table_due:
            self._table_due = True
            self.set_timer(TABLE_DEBOUNCE_S, self._redraw_table)

    def _redraw_table(self) -> None:
        self._table_due = False
        if not self.drawable:
            return
        table, jobs = self.table, self.board.visible()
        with self.prevent(DataTable.RowHighlighted):
            table.clear()
            for job in jobs:
                table.add_row(*table_cells(job), key=str(job["id"]))
            ids = [job["id"] for job in jobs]
            if self.selected in ids:
                table.move_cursor(row=ids.index(self.selected), scroll=False)
        if jobs and self.selected not in ids:
            self._select(jobs[min(table.cursor_row, len(jobs) - 1)]["id"])
        elif not jobs and self.selected is not None:
            self._select(None)
        self._show_gpus()

    def _tick(self) -> None:
        if self.drawable and any(job["state"] not in FINISHED for job in self.board.jobs.values()):
            self._table_soon()
            self._show_details()

    def _show_gpus(self) -> None:
        rows = gpu_rows(self.host, self.free.get("gpus"), self.board.jobs.values())
        lines = [f"GPU{row.index} {row.name[:10]} {row.memory}  {row.holder}" for row in rows]
        if not rows:
            lines = ["no GPUs"]
        if self.free:
            cpus, total = self.free.get("cpus", "?"), self.host.get("cpus", "?")
            lines.append(f"CPUs free {cpus}/{total}")
        self.panes["gpus"].update("\n".join(lines))

    def _show_details(self) -> None:
        job = self.current_job
        if job is None:
            text = "no job selected"
        else:
            last = {name: points[-1] for name, points in self.metrics.series.items() if points}
            text = "\n".join(detail_rows(job, last))
        self.panes["detail"].update(text)

    def _show_log_title(self) -> None:
        pane = self.log_pane
        job = "" if self.selected is None else f"job {self.selected} · "
        mode = "following" if pane.following else "paused (f: follow)"
        found = f" · /{pane.marker.term}: {len(pane.matches)} lines" if pane.marker.term else ""
        self.panes["logtitle"].update(f"output · {job}{mode}{found}")

    # -- the selected job -------------------------------------------------------------------
    @property
    def current_job(self) -> dict[str, Any] | None:
        return None if self.selected is None else self.board.jobs.get(self.selected)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            job_id = int(event.row_key.value)
            if job_id != self.selected:
                self._select(job_id)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        key = SORTABLE.get(str(event.column_key.value))
        if key is not None:
            self.board.sort_by(key)
            self._redraw_table()
            self._show_status()

    def _select(self, job_id: int | None) -> None:
        self.selected = job_id
        watch = self.feeds.begin_watch(job_id)
        self.log_pane.clear()
        self.log_pane.set_following(True)
        self.metrics.clear(job_id)
        self.plot.refresh()
        self._show_details()
        self._show_log_title()
        self.run_worker(lambda: self.feeds.open_watch(watch), thread=True,
                        group="watch", exit_on_error=False)

    # -- actions ----------------------------------------------------------------------------
    def _in_background(self, work: Callable[[], str]) -> None:
        """Run a request in a thread; its answer (or the daemon's refusal) is a notification."""
        def run() -> None:
            try:
                message, severity = work(), "information"
            except FetchmlError as exc:
                message, severity = exc.message, "error"
            except OSError as exc:  # writing pulled outputs
                message, severity = f"{exc.strerror or exc}: {exc.filename or ''}", "error"
            self.call_from_thread(self.tell, message, severity)

        self.run_worker(run, thread=True, group="actions", exit_on_error=False)

    def tell(self, message: str, severity: SeverityLevel = "information") -> None:
        """Show a notification, and keep it among the last ones told."""
        self.told.append((severity, message))
        self.notify(message, severity=severity, markup=False)

    def action_cancel_job(self) -> None:
        job = self.current_job
        if job is None:
            return
        if job["state"] in FINISHED:
            self.tell(f"job {job['id']} already ended ({job['state']})")
            return
        job_id = job["id"]

        def answered(yes: bool | None) -> None:
            if yes:
                self._in_background(lambda: self._cancel(job_id))

        stop = "stop its processes" if job["state"] == "running" else "take it off the queue"
        self.push_screen(ConfirmScreen(f"Cancel job {job_id} ({job['name'][:40]})? This "
                                       f"will {stop}."), answered)

    def _cancel(self, job_id: int) -> str:
        [job] = self.feeds.call(ops.JOBS_CANCEL.name, {"jobs": [str(job_id)]})["jobs"]
        return f"job {job_id} {'stopping' if job['state'] == 'running' else job['state']}"

    def action_requeue(self) -> None:
        job = self.current_job
        if job is not None:
            self._in_background(lambda: self._requeue(job))

    def _requeue(self, job: dict[str, Any]) -> str:
        reply = self.feeds.call(ops.JOBS_SUBMIT.name, {"snapshot": job["snapshot"],
                                                       "jobs": [requeue_spec(job)]})
        return f"queued job {reply['jobs'][0]['id']} like job {job['id']}"

    def action_pull(self) -> None:
        job = self.current_job
        if job is None:
            return
        if job["state"] in FINISHED and not job.get("outputs") and job.get("outputs_error"):
            self.tell(f"job {job['id']}'s outputs are not stored: {job['outputs_error']}",
                      "warning")
            return
        if job["state"] not in FINISHED or not job.get("outputs"):
            why = "has not ended" if job["state"] not in FINISHED else "wrote no outputs"
            self.tell(f"job {job['id']} {why}; nothing to pull", "warning")
            return
        self._in_background(lambda: self._pull(job))

    def _pull(self, job: dict[str, Any]) -> str:
        from fetchml.client.transfer import download_snapshot  # only pulls need it

        dest, n = self.pull_dir / "outputs" / str(job["id"]), 1
        while dest.exists():  # never over something already there
            n += 1
            dest = self.pull_dir / "outputs" / f"{job['id']}-{n}"
        conn = self.feeds.connection
        if conn is None:
            return "not connected to the daemon; try again once it is back"
        manifest = download_snapshot(conn, job["outputs"], dest)
        return f"pulled {manifest.file_count} files of job {job['id']} into {dest}"

    def action_cycle_state(self) -> None:
        self.board.cycle_state()
        self._redraw_table()
        self._show_status()

    def action_cycle_sort(self) -> None:
        self.board.cycle_sort()
        self._redraw_table()
        self._show_status()

    def action_filter_user(self) -> None:
        def answered(user: str | None) -> None:
            if user is not None:
                self.board.user = user or None
                self._redraw_table()
                self._show_status()

        self.push_screen(PromptScreen("only the jobs of (empty: everyone):",
                                      self.board.user or ""), answered)

    def action_toggle_scope(self) -> None:
        self.feeds.all_users = not self.feeds.all_users
        self._show_status()
        self.run_worker(self.feeds.refresh, thread=True, group="list", exit_on_error=False)

    def action_search(self) -> None:
        def answered(term: str | None) -> None:
            if term is not None:
                found = self.log_pane.search(term)
                self._show_log_title()
                if term and not found:
                    self.tell(f"{term!r} is not in the output shown", "warning")

        self.push_screen(PromptScreen("search the output for:", self.log_pane.marker.term),
                         answered)

    def action_next_match(self, step: int) -> None:
        self.log_pane.next_match(step)
        self._show_log_title()

    def action_toggle_follow(self) -> None:
        self.log_pane.set_following(not self.log_pane.following)
        self._show_log_title()

    def action_next_metric(self) -> None:
        self.metrics.cycle()
        self.plot.refresh()

    async def action_quit(self) -> None:
        self.feeds.stop()
        self.exit()
