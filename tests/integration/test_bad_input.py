"""Bad input gets one sentence and the documented exit code, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, base_env


def fetchml(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fetchml", *args], cwd=cwd,
                          env=base_env(HOME=str(cwd), **env), capture_output=True, text=True,
                          timeout=60, check=False)


def one_sentence(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args", [
    ["queue", "--memory", "99999999999999999999999G", "--", "true"],
    ["queue", "--retries", "99999999999999999999", "--", "true"],
    ["queue", "--cpus", "99999999999999999999", "--", "true"],
    ["status", "--limit", "99999999999999999999"],
    ["prune", "--keep", "99999999999999999999"],
    ["audit", "show", "--tail", "99999999999999999999"],
    ["logs", "1", "--attempt", "99999999999999999999"],
    ["user", "add", "ada", "--role", "researcher", "--uid", "-1"],
])
def test_numbers_out_of_range_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    done = fetchml(*args, cwd=tmp_path, FETCHML_SOCKET=str(tmp_path / "none.sock"))
    assert done.returncode == 2, done.stderr
    assert "range" in one_sentence(done) or "more than any machine" in done.stderr


def test_a_url_that_is_not_websocket_is_a_usage_error(tmp_path: Path) -> None:
    done = fetchml("--url", "http://127.0.0.1:9/ws", "status", cwd=tmp_path)
    assert done.returncode == 2 and "is not a ws:// or wss:// URL" in one_sentence(done)


@pytest.mark.parametrize("content", [None, "not a certificate\n"])
def test_a_missing_or_non_pem_ca_file_is_a_usage_error(tmp_path: Path,
                                                       content: str | None) -> None:
    ca = tmp_path / "ca.pem"
    if content is not None:
        ca.write_text(content)
    done = fetchml("--url", "wss://127.0.0.1:9/ws", "status", cwd=tmp_path,
                   FETCHML_CA_FILE=str(ca))
    assert done.returncode == 2 and "cannot use ca_file" in one_sentence(done)


def test_a_state_dir_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    done = fetchml("daemon", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "is not a directory" in done.stderr


def test_a_config_that_is_not_utf8_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "daemon.yaml").write_bytes(b"log_level: \xff\xfe\n")
    done = fetchml("daemon", "--config", str(tmp_path / "daemon.yaml"), "--state-dir",
                   str(tmp_path / "state"), cwd=tmp_path)
    assert done.returncode == 2 and "is not UTF-8 text" in one_sentence(done)


def test_absolute_workdirs_and_mounts_are_refused_at_submit(daemon: DaemonProcess) -> None:
    project = daemon.root / "project"
    project.mkdir()
    (project / "train.py").write_text("print('hi')\n")
    for option in (["--workdir", "/etc"], ["--dataset", "data:/etc"]):
        done = daemon.cli("queue", *option, "--", "true", cwd=project)
        assert done.returncode == 1, done.stderr
        sentence = one_sentence(done)
        assert "relative" in sentence, sentence
    with daemon.connect() as conn:
        assert conn.call("jobs.list", {})["jobs"] == []


def test_control_characters_in_a_name_cannot_break_the_table(daemon: DaemonProcess) -> None:
    project = daemon.root / "project"
    project.mkdir()
    (project / "train.py").write_text("print('hi')\n")
    queued = daemon.cli("queue", "--name", "evil\nrow\x1b[2J", "--", "true", cwd=project)
    assert queued.returncode == 0, queued.stderr
    table = daemon.cli("status").stdout
    lines = table.strip().splitlines()
    assert len(lines) == 2 and "evil\\nrow\\x1b[2J" in lines[1], table
