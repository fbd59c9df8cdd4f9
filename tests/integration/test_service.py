"""Running as a service: systemd units, sd_notify, Prometheus metrics, readiness, logs."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fetchml.cli.service_cmd import render_unit
from fetchml.errors import Unauthenticated
from tests.conftest import DaemonProcess, make_daemon

EXPOSURE_GOAL = 4.0
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


@needs_analyze
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, user: bool) -> None:
    unit = tmp_path / "fetchml.service"
    unit.write_text(render_unit(user, f"{sys.executable} -m fetchml"))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    cmd = [str(ANALYZE), *(["--user"] if user else []), "verify", str(unit)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={"XDG_RUNTIME_DIR": str(runtime), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "KillMode=process" in unit.read_text()


@needs_analyze
def test_system_unit_exposure_is_at_most_4(tmp_path: Path) -> None:
    unit = tmp_path / "fetchml.service"
    unit.write_text(render_unit(False, f"{sys.executable} -m fetchml"))
    done = subprocess.run([str(ANALYZE), "security", "--offline=yes", str(unit)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for fetchml\.service: ([0-9.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= EXPOSURE_GOAL


def test_install_service_writes_both_units(short_tmp: Path) -> None:
    for flag, marker in (([], "User=fetchml"), (["--user"], "WantedBy=default.target")):
        out = short_tmp / ("user" if flag else "system")
        done = subprocess.run([sys.executable, "-m", "fetchml", "install-service", *flag,
                               "--output", str(out)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        text = (out / "fetchml.service").read_text()
        assert marker in text and "@FETCHML@" not in text
        assert "systemctl" in done.stdout


def test_version_flag() -> None:
    done = subprocess.run([sys.executable, "-m", "fetchml", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and re.search(r"\d+\.\d+\.\d+", done.stdout)


def test_sd_notify_ready_only_when_info_answers_then_watchdog_and_stopping(
        short_tmp: Path) -> None:
    notify_path = short_tmp / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(20)
    daemon = make_daemon(short_tmp, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="200000")
    daemon.start(wait=False)
    try:
        first = listener.recv(4096).decode()
        assert first.startswith("READY=1"), first
        with daemon.connect() as conn:  # the moment READY arrives, info must answer
            assert conn.call("host.info")["host"]["cpus"] >= 1
        pings = [listener.recv(4096).decode() for _ in range(2)]
        assert pings == ["WATCHDOG=1", "WATCHDOG=1"]
        assert daemon.stop() == 0
        rest = []
        listener.settimeout(2)
        try:
            while True:
                rest.append(listener.recv(4096).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in rest
    finally:
        listener.close()
        if daemon.proc and daemon.proc.poll() is None:
            daemon.kill()


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples


def value(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str,
          **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def wait_state(daemon: DaemonProcess, job: str, states: set[str]) -> None:
    with daemon.connect() as conn:
        deadline = time.monotonic() + 30
        while conn.call("jobs.get", {"job": job})["state"] not in states:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_metrics_are_all_present_and_move_as_jobs_run(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp, "--metrics-listen", "127.0.0.1:0", FETCHML_GPUS="0")
    daemon.start()
    try:
        url = str(daemon.runtime_info["metrics"])
        base = url.rsplit("/", 1)[0]
        with urllib.request.urlopen(base + "/ready", timeout=10) as response:
            assert json.loads(response.read())["status"] == "ready"
        before = scrape(url)
        for name in ("fetchml_jobs", "fetchml_gpus_allocated", "fetchml_gpus",
                     "fetchml_sync_received_bytes_total", "fetchml_store_objects",
                     "fetchml_store_bytes", "fetchml_sessions", "fetchml_auth_failures_total",
                     "fetchml_job_run_seconds_count", "fetchml_job_wait_seconds_count",
                     "fetchml_sync_deduplicated_bytes_total"):
            assert name in before, name
        project = short_tmp / "proj"
        project.mkdir()
        (project / "job.py").write_text("import time\ntime.sleep(1.5)\n")
        done = daemon.cli("queue", "--gpus", "1", "--json", "--", "python3", "job.py",
                          cwd=project)
        assert done.returncode == 0, done.stderr
        job = str(json.loads(done.stdout)["jobs"][0]["id"])
        wait_state(daemon, job, {"running"})
        with daemon.connect():
            during = scrape(url)
            assert value(during, "fetchml_sessions") >= 1
        assert value(during, "fetchml_jobs", state="running") == 1
        assert value(during, "fetchml_gpus_allocated") == 1
        assert value(during, "fetchml_sync_received_bytes_total") > 0
        assert value(during, "fetchml_job_wait_seconds_count") == 1
        with pytest.raises(Unauthenticated):
            daemon.connect(api_key="fml_not_a_key")
        wait_state(daemon, job, {"succeeded"})
        after = scrape(url)
        assert value(after, "fetchml_jobs", state="succeeded") == 1
        assert value(after, "fetchml_jobs", state="running") == 0
        assert value(after, "fetchml_gpus_allocated") == 0
        assert value(after, "fetchml_job_run_seconds_count") == 1
        assert value(after, "fetchml_job_run_seconds_sum") >= 1.0
        assert value(after, "fetchml_auth_failures_total") == 1
        assert value(after, "fetchml_request_seconds_count", op="jobs.submit") == 1
        assert value(after, "fetchml_request_seconds_count", op="cas.put") >= 1
        assert "fetchml_queue_depth" in scrape(daemon_metrics_with_queue(daemon, project))
    finally:
        daemon.stop()


def test_syncing_a_copy_of_a_synced_tree_counts_deduplicated_bytes(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp, "--metrics-listen", "127.0.0.1:0", FETCHML_GPUS="0")
    daemon.start()
    try:
        url = str(daemon.runtime_info["metrics"])
        first = short_tmp / "one"
        (first / "pkg").mkdir(parents=True)
        (first / "train.py").write_text("print('train')\n")
        (first / "pkg" / "data.bin").write_bytes(bytes(range(256)) * 64)
        done = daemon.cli("sync", "--json", str(first))
        assert done.returncode == 0, done.stderr
        synced = json.loads(done.stdout)
        assert synced["sent_bytes"] == synced["bytes"] > 0
        assert value(scrape(url), "fetchml_sync_deduplicated_bytes_total") == 0
        received = value(scrape(url), "fetchml_sync_received_bytes_total")
        assert received >= synced["bytes"]
        copy = short_tmp / "elsewhere" / "two"
        shutil.copytree(first, copy)
        done = daemon.cli("sync", "--json", str(copy))
        assert done.returncode == 0, done.stderr
        again = json.loads(done.stdout)
        assert again["snapshot"] == synced["snapshot"] and again["sent_bytes"] == 0
        after = scrape(url)
        assert value(after, "fetchml_sync_deduplicated_bytes_total") == synced["bytes"] > 0
        assert value(after, "fetchml_sync_received_bytes_total") == received
    finally:
        daemon.stop()


def daemon_metrics_with_queue(daemon: DaemonProcess, project: Path) -> str:
    """Queue more jobs than fit and return the metrics URL (queue depth by priority shows)."""
    for priority in ("3", "7"):
        done = daemon.cli("queue", "--gpus", "1", "--priority", priority, "--", "sleep", "5",
                          cwd=project)
        assert done.returncode == 0, done.stderr
    return str(daemon.runtime_info["metrics"])


def test_json_logs_under_journald(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp, JOURNAL_STREAM="8:1234", FETCHML_LOG_LEVEL="debug").start()
    daemon.stop()
    lines = [line for line in daemon.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any("listening on unix socket" in r["message"] for r in records)
