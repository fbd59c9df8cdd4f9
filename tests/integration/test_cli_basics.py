"""init, info, config show, exit codes, and the daemon's single-instance rules."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import DaemonProcess, base_env, make_daemon


def run_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fetchml", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def plain_env(home: Path, **extra: str) -> dict[str, str]:
    """No FETCHML_SOCKET: the CLI must find the daemon through the project's config."""
    return base_env(HOME=str(home), **extra)


def test_init_outside_git_twice_then_info_finds_the_daemon(daemon: DaemonProcess,
                                                           short_tmp: Path) -> None:
    project = short_tmp / "proj"
    project.mkdir()
    env = plain_env(short_tmp / "home")
    first = run_cli("init", "--socket", str(daemon.socket), cwd=project, env=env)
    assert first.returncode == 0, first.stderr
    assert "wrote .fetchml/config.yaml" in first.stdout and "as " in first.stdout
    assert (project / ".fetchmlignore").read_text().startswith("# Files fetchml does not")
    assert not (project / ".gitignore").exists()
    second = run_cli("init", "--socket", str(daemon.socket), cwd=project, env=env)
    assert second.returncode == 0, second.stderr
    assert "already initialised: nothing changed" in second.stdout
    (project / "deeper").mkdir()
    info = run_cli("info", "--json", cwd=project / "deeper", env=env)
    assert info.returncode == 0, info.stderr
    document = json.loads(info.stdout)
    assert set(document) >= {"protocol", "daemon", "user", "role", "host"}
    assert set(document["host"]) >= {"name", "cpus", "memory", "gpus"}


def test_init_inside_git_adds_fetchml_to_gitignore_once(daemon: DaemonProcess,
                                                        short_tmp: Path) -> None:
    repo = short_tmp / "repo"
    project = repo / "exp"
    project.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (project / ".gitignore").write_text("*.ckpt")
    env = plain_env(short_tmp / "home", FETCHML_SOCKET=str(daemon.socket))
    first = run_cli("init", cwd=project, env=env)
    assert first.returncode == 0, first.stderr
    assert (project / ".gitignore").read_text() == "*.ckpt\n.fetchml/\n"
    config = (project / ".fetchml/config.yaml").read_text()
    assert f"socket: {daemon.socket}" in config
    second = run_cli("init", cwd=project, env=env)
    assert "already initialised: nothing changed" in second.stdout
    assert (project / ".gitignore").read_text() == "*.ckpt\n.fetchml/\n"
    info = run_cli("info", cwd=project, env=plain_env(short_tmp / "home"))
    assert info.returncode == 0 and "admin" in info.stdout, info.stderr


def test_init_save_key_writes_a_private_file(daemon: DaemonProcess, short_tmp: Path) -> None:
    project = short_tmp / "keyed"
    project.mkdir()
    env = plain_env(short_tmp / "home", FETCHML_API_KEY="not-a-real-key")
    done = run_cli("init", "--socket", str(daemon.socket), "--save-key", cwd=project, env=env)
    # the key is unknown to the daemon, so the check fails, but the file is written 0600
    assert done.returncode == 4, done.stderr
    path = project / ".fetchml/config.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "not-a-real-key" in path.read_text()
    assert "not-a-real-key" not in done.stderr + done.stdout


def test_unreachable_daemon_exits_3_with_one_sentence(short_tmp: Path) -> None:
    env = plain_env(short_tmp / "home", FETCHML_SOCKET=str(short_tmp / "nothing.sock"))
    done = run_cli("info", cwd=short_tmp, env=env)
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the daemon" in lines[0]
    assert "fetchml daemon" in lines[0]


def test_usage_errors_exit_2(short_tmp: Path) -> None:
    env = plain_env(short_tmp / "home")
    done = run_cli("--socket", "a", "--url", "ws://b", "info", cwd=short_tmp, env=env)
    assert done.returncode == 2
    (short_tmp / ".fetchml").mkdir()
    (short_tmp / ".fetchml/config.yaml").write_text("sockett: /x\n")
    done = run_cli("info", cwd=short_tmp, env=env)
    assert done.returncode == 2 and "'sockett'" in done.stderr


def test_config_show_reports_sources(short_tmp: Path) -> None:
    env = plain_env(short_tmp / "home", FETCHML_DEBOUNCE="1s")
    done = run_cli("config", "show", "--json", cwd=short_tmp, env=env)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["debounce"] == {"value": 1.0, "source": "env FETCHML_DEBOUNCE"}
    assert document["url"]["source"] == "default"
    done = run_cli("config", "show", "--daemon-config", cwd=short_tmp, env=env)
    assert "state_dir" in done.stdout and "SOURCE" in done.stdout
    done = run_cli("config", "show", "--daemon", cwd=short_tmp, env=env)  # it never asked one
    assert done.returncode == 2 and "No such option" in done.stderr


def test_second_daemon_on_the_same_state_dir_refuses(daemon: DaemonProcess) -> None:
    second = make_daemon(daemon.root)
    second.log_path = daemon.root / "second.log"
    second.start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(timeout=20) != 0
    assert "another fetchml daemon" in second.log()
    assert daemon.socket.exists()
    with daemon.connect() as conn:
        assert "time" in conn.call("host.ping")


def test_daemon_refuses_a_socket_another_daemon_answers(daemon: DaemonProcess,
                                                        short_tmp: Path) -> None:
    other_root = short_tmp / "other"
    other_root.mkdir()
    other = make_daemon(other_root, FETCHML_SOCKET=str(daemon.socket))
    other.start(wait=False)
    assert other.proc is not None
    assert other.proc.wait(timeout=20) != 0
    assert "already answers" in other.log()
    with daemon.connect() as conn:
        assert "time" in conn.call("host.ping")


def test_socket_left_by_a_killed_daemon_does_not_stop_a_new_one(
        daemon_process: DaemonProcess) -> None:
    daemon = daemon_process
    daemon.kill()
    assert daemon.socket.exists()
    daemon.start()
    with daemon.connect() as conn:
        assert "time" in conn.call("host.ping")
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    daemon.stop()
    assert not daemon.socket.exists()


def test_tcp_listener_on_port_zero_is_logged_and_needs_a_key(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp, "--listen", "127.0.0.1:0").start()
    try:
        url = str(daemon.runtime_info["url"])
        assert url.startswith("ws://127.0.0.1:") and not url.endswith(":0/ws")
        assert url in daemon.log()
        done = run_cli("--url", url, "info", cwd=short_tmp, env=plain_env(short_tmp / "home"))
        assert done.returncode == 4 and "API key" in done.stderr
    finally:
        daemon.stop()


def test_non_loopback_listener_without_tls_is_refused(short_tmp: Path) -> None:
    daemon = make_daemon(short_tmp, "--listen", "0.0.0.0:0")
    daemon.start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(timeout=20) == 2
    assert "without TLS" in daemon.log()
