"""fetchml watch against a real daemon: one real watcher process per test, its JSON lines read
by a thread with timeouts."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, make_inprocess_daemon

LINE_TIMEOUT_S = 30.0
PYVENV = "home = /usr/bin\ninclude-system-site-packages = false\n"


class Watcher:
    """A `fetchml watch --json` process; stdout lines parsed into a queue, stderr kept."""

    def __init__(self, daemon: DaemonProcess, project: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        run_env = dict(daemon.env, FETCHML_SOCKET=str(daemon.socket), **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fetchml", "watch", "--json", *args], cwd=project,
            env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict[str, Any] | str] = queue.Queue()
        self.stderr: list[str] = []
        self.readers = [threading.Thread(target=self._read_stdout, daemon=True),
                        threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put(line)  # not JSON: the test that reads it fails on it

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def next_line(self, timeout: float = LINE_TIMEOUT_S) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no sync line in {timeout} s; stderr:\n"
                                 f"{''.join(self.stderr)}") from None
        assert isinstance(line, dict), f"stdout held a non-JSON line: {line!r}"
        return line

    def line_for(self, snapshot: str, limit: int = 10) -> list[dict[str, Any]]:
        """Lines up to and including the one that stored ``snapshot``."""
        seen: list[dict[str, Any]] = []
        while len(seen) < limit:
            seen.append(self.next_line())
            if seen[-1]["snapshot"] == snapshot:
                return seen
        raise AssertionError(f"snapshot {snapshot[:12]} never synced: {seen}")

    def assert_quiet(self, seconds: float) -> None:
        """No sync line within ``seconds`` (several debounce periods)."""
        try:
            line = self.lines.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected sync line {line}")

    def wait_stderr(self, text: str, timeout: float = LINE_TIMEOUT_S) -> None:
        wait_until(lambda: text in "".join(self.stderr), timeout, f"{text!r} on stderr")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for reader in self.readers:
                reader.join(timeout=5)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()

    def inotify_watches(self) -> int:
        """Watches held by the process's inotify instances (from /proc fdinfo)."""
        total = 0
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink(fd_dir / fd) != "anon_inode:inotify":
                    continue
                info = Path(f"/proc/{self.proc.pid}/fdinfo/{fd}").read_text()
            except OSError:
                continue  # closed meanwhile
            total += sum(1 for line in info.splitlines() if line.startswith("inotify wd:"))
        return total


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def expected_snapshot(daemon: DaemonProcess, project: Path) -> str:
    """The id `fetchml sync` gives the tree as it is now (a dry run: nothing stored)."""
    done = daemon.cli("sync", "--json", "--dry-run", str(project))
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["snapshot"])


def make_project(root: Path) -> Path:
    files = {"train.py": "print('train')\n", "pkg/model.py": "class Net: ...\n",
             "pkg/util.py": "X = 1\n", "configs/base.yaml": "lr: 0.1\n"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture
def project(short_tmp: Path) -> Path:
    return make_project(short_tmp / "proj")


def watching(daemon: DaemonProcess, project: Path) -> Iterator[Watcher]:
    running = Watcher(daemon, project)
    yield running
    assert running.stop() == 130
    assert "Traceback" not in "".join(running.stderr)


@pytest.fixture
def watcher(daemon: DaemonProcess, project: Path) -> Iterator[Watcher]:
    yield from watching(daemon, project)


@pytest.fixture
def process_watcher(daemon_process: DaemonProcess, project: Path) -> Iterator[Watcher]:
    yield from watching(daemon_process, project)


def test_a_single_save_syncs_once_reading_only_that_file(
        daemon: DaemonProcess, project: Path, watcher: Watcher) -> None:
    first = watcher.next_line()
    assert first["snapshot"] == expected_snapshot(daemon, project)
    assert (first["files"], first["sent_files"]) == (4, 4)
    (project / "pkg/model.py").write_text("class Net: pass\n")
    line = watcher.next_line()
    assert (line["changed"], line["hashed_files"], line["sent_files"]) == (1, 1, 1)
    assert line["sent_bytes"] == len("class Net: pass\n")
    assert line["snapshot"] == expected_snapshot(daemon, project)
    stored = daemon.state_dir / "snapshots" / line["snapshot"][:2] / line["snapshot"][2:]
    assert stored.is_file()


def test_json_lines_carry_the_sync_object_and_changed(watcher: Watcher, project: Path) -> None:
    first = watcher.next_line()
    (project / "new.txt").write_text("hello")
    line = watcher.next_line()
    for doc in (first, line):
        assert {"snapshot", "files", "bytes", "sent_files", "sent_bytes", "changed"} <= set(doc)
        assert len(doc["snapshot"]) == 64 and "jobs" not in doc
        assert all(isinstance(doc[k], int) for k in ("files", "bytes", "sent_files",
                                                     "sent_bytes", "changed"))
    assert (line["files"], line["bytes"]) == (5, first["bytes"] + 5)


def test_an_atomic_save_and_editor_junk_give_one_sync_of_one_path(
        daemon: DaemonProcess, project: Path, watcher: Watcher) -> None:
    watcher.next_line()
    # What vim does on :w: probe file 4913, swap file, backup, temp file renamed over.
    (project / "pkg/4913").write_text("")
    (project / "pkg/4913").unlink()
    (project / "pkg/.util.py.swp").write_bytes(b"\0swap")
    os.link(project / "pkg/util.py", project / "pkg/util.py~")
    temp = project / "pkg/.util.py.tmp123"
    temp.write_text("X = 2\n")
    os.replace(temp, project / "pkg/util.py")
    (project / ".#model.py").symlink_to("user@host.1234")
    line = watcher.next_line()
    assert (line["changed"], line["sent_files"], line["files"]) == (1, 1, 4)
    assert line["snapshot"] == expected_snapshot(daemon, project)


def test_a_storm_of_5000_files_takes_at_most_three_syncs(
        daemon: DaemonProcess, project: Path, watcher: Watcher) -> None:
    watcher.next_line()
    # A branch switch: new directories full of files, existing files rewritten and removed.
    for index in range(5000):
        folder = project / "gen" / f"d{index // 100:02d}"
        if index % 100 == 0:
            folder.mkdir(parents=True)
        (folder / f"f{index:04d}.py").write_text(f"N = {index}\n")
    (project / "pkg/util.py").write_text("X = 3\n")
    (project / "configs/base.yaml").unlink()
    final = expected_snapshot(daemon, project)
    lines = watcher.line_for(final, limit=3)
    assert lines[-1]["files"] == 5003
    assert sum(line["changed"] for line in lines) >= 5002


def test_delete_and_recreate(daemon: DaemonProcess, project: Path, watcher: Watcher) -> None:
    first = watcher.next_line()
    content = (project / "pkg/model.py").read_text()
    (project / "pkg/model.py").unlink()
    gone = watcher.next_line()
    assert (gone["files"], gone["changed"], gone["sent_files"]) == (3, 1, 0)
    (project / "pkg/model.py").write_text(content)
    back = watcher.next_line()
    assert back["snapshot"] == first["snapshot"] and back["sent_files"] == 0
    # The last file of a directory: the directory stays, listed as empty.
    for name in ("model.py", "util.py"):
        (project / "pkg" / name).unlink()
    emptied = watcher.next_line()
    assert emptied["snapshot"] == expected_snapshot(daemon, project)


def test_new_and_removed_directories_are_watched_and_synced(
        daemon: DaemonProcess, project: Path, watcher: Watcher) -> None:
    watcher.next_line()
    (project / "a/b/c").mkdir(parents=True)
    (project / "a/b/c/deep.py").write_text("deep")
    assert watcher.next_line()["snapshot"] == expected_snapshot(daemon, project)
    (project / "a/b/c/later.py").write_text("later")  # only seen if a/b/c is watched now
    assert watcher.next_line()["files"] == 6
    os.rename(project / "a", project / "z")
    assert watcher.next_line()["snapshot"] == expected_snapshot(daemon, project)


def test_ignored_trees_get_no_inotify_watches(daemon: DaemonProcess, project: Path) -> None:
    venv = project / ".venv"
    for index in range(400):  # a virtualenv's package folders, whatever it is called
        (venv / "lib" / f"pkg{index}").mkdir(parents=True)
        (venv / "lib" / f"pkg{index}" / "__init__.py").write_text("")
    (venv / "pyvenv.cfg").write_text(PYVENV)
    for index in range(100):
        (project / "data" / f"shard{index}").mkdir(parents=True)
    (project / ".fetchmlignore").write_text("data/\n")
    running = Watcher(daemon, project)
    try:
        assert running.next_line()["files"] == 5  # the four files and .fetchmlignore
        kept = 3  # the root, pkg/ and configs/
        wait_until(lambda: running.inotify_watches() == kept, 10, f"{kept} watches")
        (project / "newdir").mkdir()
        (project / "newdir/x.py").write_text("x")
        assert running.next_line()["files"] == 6
        wait_until(lambda: running.inotify_watches() == kept + 1, 10, "one more watch")
        # A second virtualenv appearing is dropped from the watch again.
        (project / "newdir/pyvenv.cfg").write_text(PYVENV)
        assert running.next_line()["files"] == 5
        wait_until(lambda: running.inotify_watches() == kept, 10, "the new venv unwatched")
    finally:
        assert running.stop() == 130


def test_the_watch_limit_falls_back_to_polling_with_one_warning(
        daemon: DaemonProcess, project: Path) -> None:
    running = Watcher(daemon, project, env={"FETCHML_WATCH_LIMIT": "1"})
    try:
        running.next_line()
        (project / "pkg/model.py").write_text("polled")
        assert running.next_line()["changed"] == 1
        (project / "more").mkdir()
        (project / "more/m.py").write_text("m")
        assert running.next_line()["files"] == 5
        assert running.inotify_watches() == 0
    finally:
        assert running.stop() == 130
    warnings = [line for line in running.stderr if "polling" in line]
    assert len(warnings) == 1, running.stderr
    assert "max_user_watches" in warnings[0]


def test_the_watcher_survives_a_daemon_restart(
        daemon_process: DaemonProcess, project: Path, process_watcher: Watcher) -> None:
    daemon, watcher = daemon_process, process_watcher
    watcher.next_line()
    daemon.kill()
    (project / "train.py").write_text("print('while the daemon was down')\n")
    watcher.wait_stderr("cannot sync")
    daemon.start()
    back = watcher.next_line()
    assert back["changed"] == 1 and back["snapshot"] == expected_snapshot(daemon, project)
    daemon.kill()
    daemon.start()  # restarted while the watcher was idle: its connection is stale
    (project / "train.py").write_text("print('after the restart')\n")
    after = watcher.next_line()
    assert after["snapshot"] == expected_snapshot(daemon, project)
    assert "reconnected" in "".join(watcher.stderr)


def test_a_file_problem_is_reported_and_watching_goes_on(
        daemon: DaemonProcess, project: Path) -> None:
    running = Watcher(daemon, project, env={"FETCHML_MAX_FILE_SIZE": "100"})
    try:
        running.next_line()
        (project / "big.bin").write_bytes(b"x" * 1000)
        running.wait_stderr("max_file_size")
        (project / "big.bin").unlink()
        (project / "small.txt").write_text("ok")
        assert running.next_line()["snapshot"] == expected_snapshot(daemon, project)
    finally:
        assert running.stop() == 130


def temp_objects(daemon: DaemonProcess) -> list[Path]:
    """Uploads in progress: the store's temp files."""
    return list((daemon.state_dir / "objects").glob("*/.tmp-*"))


def test_ctrl_c_mid_upload_leaves_nothing_half_written(
        daemon: DaemonProcess, project: Path) -> None:
    running = Watcher(daemon, project)
    running.next_line()
    with (project / "weights.bin").open("wb") as stream:
        for _ in range(96):
            stream.write(os.urandom(1 << 20))
    wait_until(lambda: bool(temp_objects(daemon)), 30, "the upload to start")
    assert running.stop() == 130
    assert "Traceback" not in "".join(running.stderr)
    wait_until(lambda: not temp_objects(daemon), 10, "the partial upload to be discarded")
    checked = daemon.cli("fsck", "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout)["problems"] == []


@pytest.fixture
def one_cpu_daemon(short_tmp: Path) -> Iterator[DaemonProcess]:
    proc = make_inprocess_daemon(short_tmp, FETCHML_CPUS="1").start()
    yield proc
    with proc.connect() as conn:  # jobs outlive the daemon: stop them first
        active = conn.call("jobs.list", {"states": ["queued", "running", "held"]})["jobs"]
        if active:
            conn.call("jobs.cancel", {"jobs": [str(job["id"]) for job in active]})
    proc.stop()


def job(daemon: DaemonProcess, job_id: Any) -> dict[str, Any]:
    with daemon.connect() as conn:
        return conn.call("jobs.get", {"job": str(job_id)})  # type: ignore[no-any-return]


SLEEPER = ["--", sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.mark.parametrize("restart", [False, True])
def test_a_new_snapshot_supersedes_the_queued_job(
        one_cpu_daemon: DaemonProcess, project: Path, restart: bool) -> None:
    flags = ["--restart"] if restart else []
    running = Watcher(one_cpu_daemon, project, *flags, *SLEEPER)
    try:
        first = running.next_line()
        [first_job] = first["jobs"]
        assert set(first_job) == {"id", "name", "state"}
        wait_until(lambda: job(one_cpu_daemon, first_job["id"])["state"] == "running", 20,
                   "the first job to run")
        (project / "train.py").write_text("v2")
        [second_job] = running.next_line()["jobs"]
        (project / "train.py").write_text("v3")
        [third_job] = running.next_line()["jobs"]
        # A running job ends (TERM, then its exit is recorded) a little after the cancel.
        def cancelled(job_id: Any) -> Callable[[], bool]:
            return lambda: bool(job(one_cpu_daemon, job_id)["state"] == "cancelled")

        for older in [first_job, second_job] if restart else [second_job]:
            wait_until(cancelled(older["id"]), 20, f"job {older['id']} cancelled")
            assert "superseded" in job(one_cpu_daemon, older["id"])["reason"]
        if restart:
            wait_until(lambda: job(one_cpu_daemon, third_job["id"])["state"] == "running", 30,
                       "the newest job to run")
        else:
            assert job(one_cpu_daemon, first_job["id"])["state"] == "running"
            assert job(one_cpu_daemon, third_job["id"])["state"] == "queued"
        # A burst that leaves the snapshot as it was (same bytes saved again) queues nothing.
        (project / "train.py").write_text("v3")
        running.assert_quiet(1.0)
        with one_cpu_daemon.connect() as conn:
            assert len(conn.call("jobs.list", {"limit": 100})["jobs"]) == 3
    finally:
        assert running.stop() == 130


def test_bad_usage_exits_2_a_refused_job_1_and_an_absent_daemon_3(
        daemon: DaemonProcess, project: Path, short_tmp: Path) -> None:
    for args, env in ((["--restart"], {}), (["--gpus", "1"], {}),
                      (["--debounce", "soon"], {}), (["/nonexistent"], {}),
                      ([], {"FETCHML_WATCH_LIMIT": "many"})):
        done = daemon.cli("watch", *args, cwd=project, env=env, timeout=20)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr
    refused = daemon.cli("watch", "--cpus", "4096", "--", "true", cwd=project, timeout=30)
    assert refused.returncode == 1 and "can never start" in refused.stderr
    assert "Traceback" not in refused.stderr
    env = dict(daemon.env, FETCHML_SOCKET=str(short_tmp / "nothing.sock"))
    done = subprocess.run([sys.executable, "-m", "fetchml", "watch"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode == 3 and "cannot reach the daemon" in done.stderr
