"""Isolation modes: which a job may ask for, CPU placement, and the bwrap and podman command
lines (bwrap's run for real: what a sandbox shows and hides)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fetchml.config import DaemonSettings
from fetchml.daemon.isolation.sandbox import (
    BWRAP_WRAPPER_DEPTH,
    Layout,
    PodmanOptions,
    bwrap_argv,
    command_visible,
    gpu_device_nodes,
    podman_argv,
    podman_env_file,
)
from fetchml.daemon.isolation.service import (
    CpuPool,
    allowed_modes,
    daemon_tag,
    find_tools,
    job_isolation,
)
from fetchml.daemon.supervise.records import RunSpec, read_status, write_json_atomic
from fetchml.daemon.supervise.rundir import PODMAN_ENV_FILE
from fetchml.errors import BadRequest, ConfigError
from tests.unit.test_limits import PACKAGE_ROOT

BWRAP = shutil.which("bwrap")
needs_bwrap = pytest.mark.skipif(BWRAP is None, reason="bubblewrap is not installed")


def settings(**fields: object) -> DaemonSettings:
    return DaemonSettings(state_dir=Path("/tmp/unused"), **fields)  # type: ignore[arg-type]


# -- which modes a job may ask for --------------------------------------------------------------


def test_a_job_may_ask_for_the_default_or_a_choice() -> None:
    s = settings(isolation="bwrap", isolation_choices=["none", "bwrap"])
    assert allowed_modes(s) == ("bwrap", "none")
    assert job_isolation(s, None) is None
    assert job_isolation(s, "none") == "none"
    assert job_isolation(s, "bwrap") == "bwrap"
    for bad in ("podman", "", "BWRAP", 1, ["none"]):
        with pytest.raises(BadRequest, match="is not offered here; choose one of bwrap, none"):
            job_isolation(s, bad)
    assert allowed_modes(settings()) == ("none",)


def test_find_tools_checks_the_modes_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="isolation_choices has 'docker'"):
        find_tools(settings(isolation_choices=["docker"]))
    assert find_tools(settings()) == (None, None)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="isolation bwrap needs bubblewrap"):
        find_tools(settings(isolation="bwrap"))
    with pytest.raises(ConfigError, match="isolation podman needs podman"):
        find_tools(settings(isolation_choices=["podman"]))


@needs_bwrap
def test_find_tools_runs_bwrap_once() -> None:
    assert find_tools(settings(isolation="bwrap")) == (BWRAP, None)


def test_daemon_tag_names_the_state_dir() -> None:
    assert daemon_tag(Path("/a/state")) == daemon_tag(Path("/a/state"))
    assert daemon_tag(Path("/a/state")) != daemon_tag(Path("/b/state"))
    assert len(daemon_tag(Path("/a"))) == 10


# -- CPUs --------------------------------------------------------------------------------------


def test_cpu_pool_pins_to_the_least_used_cpus() -> None:
    pool = CpuPool([0, 1, 2, 3])
    assert pool.take(1, 1, 2) == (0, 1)
    assert pool.take(2, 1, 1) == (2,)
    assert pool.take(3, 1, 2) == (0, 3)  # 3 is free; then the lowest of those used once
    assert pool.in_use() == {0: 2, 1: 1, 2: 1, 3: 1}
    assert pool.take(4, 1, 4) is None  # the whole host: no pinning
    assert pool.take(4, 1, 9) is None
    assert pool.take(1, 1, 2) == pool.take(1, 1, 2)  # taking again does not count twice
    before = pool.in_use()
    pool.release_except(2, running_attempt=1)  # its running attempt keeps its CPU
    assert pool.in_use() == before
    pool.release_except(2, running_attempt=None)
    pool.release_except(1, running_attempt=None)
    pool.release_except(3, running_attempt=None)
    assert set(pool.in_use().values()) == {0}
    pool.hold(9, 2, [3, 17])  # re-adopted after a restart; CPU 17 is not ours any more
    assert pool.in_use() == {0: 0, 1: 0, 2: 0, 3: 1}
    assert pool.take(10, 1, 1) == (0,)
    pool.release_except(9, running_attempt=None)
    assert pool.in_use()[3] == 0


# -- bwrap -------------------------------------------------------------------------------------


def make_layout(tmp_path: Path) -> Layout:
    state = tmp_path / "state"
    run_dir = state / "runs" / "7" / "1"
    for sub in ("work", "outputs", "data"):
        (run_dir / sub).mkdir(parents=True)
    (state / "jobs.db").write_text("private")
    (state / "runs" / "6" / "1" / "work").mkdir(parents=True)
    (state / "runs" / "6" / "1" / "work" / "theirs").write_text("theirs")
    (state / "datasets" / "mnist@1").mkdir(parents=True)
    (state / "datasets" / "mnist@1" / "train").write_text("data")
    (run_dir / "data" / "mnist").symlink_to(state / "datasets" / "mnist@1")
    (run_dir / "metrics.jsonl").touch()  # made for the job by a workspace hook
    return Layout(run_dir=run_dir, cwd=str(run_dir / "work"), state_dir=state)


def in_bwrap(layout: Layout, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    assert BWRAP is not None
    argv = bwrap_argv(BWRAP, layout, ["sh", "-c", script], **kwargs)  # type: ignore[arg-type]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(layout.outputs)})


@needs_bwrap
def test_bwrap_shows_the_run_and_hides_the_rest(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    hidden_dir = tmp_path / "etc-secret"
    hidden_dir.mkdir()
    (hidden_dir / "key").write_text("k")
    script = """
    for p in "$STATE/jobs.db" "$STATE/runs/6/1/work/theirs" /root "$HIDDEN/key"; do
        cat "$p" >/dev/null 2>&1 && echo "read $p"
    done
    cat data/../data/mnist/train > "$OUT/copied"
    echo new > "$DATA/mnist/train" 2>/dev/null && echo "wrote dataset"
    touch work-file "$OUT/out-file" /tmp/private
    echo '{"step": 1}' >> "$RUN/metrics.jsonl"
    pwd
    """.replace("$STATE", str(layout.state_dir)).replace("$HIDDEN", str(hidden_dir)).replace(
        "$DATA", str(layout.run_dir / "data")).replace("data/../data", str(layout.run_dir / "data")
    ).replace("$RUN", str(layout.run_dir))
    done = in_bwrap(layout, script, network=False, gpu_ids=(), hidden=(str(hidden_dir),))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [layout.cwd]  # nothing read, nothing written where it may not
    assert (layout.outputs / "copied").read_text() == "data"
    assert (layout.state_dir / "datasets" / "mnist@1" / "train").read_text() == "data"
    assert (layout.work / "work-file").exists() and (layout.outputs / "out-file").exists()
    assert (layout.run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


@needs_bwrap
def test_user_argv_never_becomes_a_bwrap_option(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    assert BWRAP is not None
    argv = bwrap_argv(BWRAP, layout, ["--bind", "/", "/"], network=True, gpu_ids=())
    assert argv[argv.index("--") + 1:] == ["--bind", "/", "/"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0
    assert "execvp --bind" in done.stderr


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes needs root")
def test_bwrap_shows_only_the_jobs_gpus(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm"):
        os.mknod(dev / name, 0o666 | 0o020000, os.makedev(1, 3))  # character devices: null
    assert gpu_device_nodes([1], dev) == [str(dev / "nvidia1"), str(dev / "nvidiactl"),
                                         str(dev / "nvidia-uvm")]
    assert gpu_device_nodes([], dev) == []
    layout = make_layout(tmp_path)
    done = in_bwrap(layout, "ls /dev | grep nvidia; echo hi > /dev/nvidia1", network=True,
                    gpu_ids=[1], dev=dev)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["nvidia-uvm", "nvidia1", "nvidiactl"]


def test_command_visible_inside_the_sandbox(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    script = work / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    env = {"PATH": f"{tmp_path}/hidden-bin:/usr/bin:/bin"}
    visible = ["/usr", "/bin", str(work)]
    assert command_visible("sh", env, visible, str(work))
    assert command_visible("./run.sh", env, visible, str(work))
    assert command_visible(str(script), env, visible, str(work))
    assert not command_visible("no-such-command", env, visible, str(work))
    (tmp_path / "hidden-bin").mkdir()
    tool = tmp_path / "hidden-bin" / "only-here"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert not command_visible("only-here", env, visible, str(work))
    assert not command_visible("../hidden-bin/only-here", env, visible, str(work))


@needs_bwrap
def test_sigterm_reaches_the_command_and_spares_the_sandbox(tmp_path: Path) -> None:
    """Cancel: the command gets SIGTERM and its grace; bwrap itself is not signalled, since
    its death would kill everything inside at once."""
    layout = make_layout(tmp_path)
    assert BWRAP is not None
    script = ('trap \'sleep 0.3; echo graceful > "$OUT/term"; exit 7\' TERM; '
              'touch "$OUT/ready"; while true; do sleep 0.05; done')
    argv = bwrap_argv(BWRAP, layout, ["sh", "-c", script], network=True, gpu_ids=())
    spec = RunSpec(argv=tuple(argv), env={"PATH": "/usr/bin:/bin", "OUT": str(layout.outputs)},
                   cwd=layout.cwd, kill_grace=10.0, wrapper_depth=BWRAP_WRAPPER_DEPTH)
    write_json_atomic(layout.run_dir / "spec.json", spec.to_dict())
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "fetchml.daemon.supervise.supervisor", str(layout.run_dir)],
        env={**os.environ, "PYTHONPATH": PACKAGE_ROOT}, start_new_session=True)
    deadline = time.monotonic() + 20
    while not (layout.outputs / "ready").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0
    status = read_status(layout.run_dir)
    assert status is not None and status.reason == "cancelled"
    assert (layout.outputs / "term").read_text() == "graceful\n"
    assert status.exit_code == 7  # bwrap passes on the command's own exit status
    assert time.monotonic() - started < 5


# -- podman ------------------------------------------------------------------------------------


def test_podman_argv_keeps_user_values_out_of_its_options(tmp_path: Path) -> None:
    layout = make_layout(tmp_path)
    (layout.run_dir / PODMAN_ENV_FILE).write_text("A=1\n")  # written before the argv
    options = PodmanOptions(podman="/usr/bin/podman", image="docker.io/library/python:3.11",
                            name="fetchml-abc-7-1", network=False, rootless=True,
                            memory=512 << 20, pids=100, cpus=(2, 3))
    user_argv = ["--privileged", "-v", "/:/host"]
    argv = podman_argv(options, layout, user_argv, gpu_ids=[])
    image_at = argv.index(options.image)
    assert argv[image_at + 1:] == user_argv
    ours = argv[2:image_at]
    assert all(a.startswith("--") for a in ours)
    assert "--privileged" not in ours
    assert {"--rm", "--cap-drop=all", "--security-opt=no-new-privileges", "--read-only",
            "--network=none", "--userns=keep-id", f"--memory={512 << 20}", "--pids-limit=100",
            "--cpuset-cpus=2,3", f"--env-file={layout.run_dir / PODMAN_ENV_FILE}",
            f"--volume={layout.work}:{layout.work}:rw",
            f"--volume={layout.state_dir / 'datasets'}:{layout.state_dir / 'datasets'}:ro",
            f"--workdir={layout.cwd}",
            f"--volume={layout.run_dir / 'metrics.jsonl'}:{layout.run_dir / 'metrics.jsonl'}:rw",
            } <= set(ours)
    assert not any(PODMAN_ENV_FILE in a and a.startswith("--volume") for a in ours)
    rootful = podman_argv(PodmanOptions(podman="podman", image="img", name="n", network=True,
                                        rootless=False), layout, ["true"], gpu_ids=[])
    assert "--userns=keep-id" not in rootful and "--network=none" not in rootful


def test_podman_env_file_refuses_what_it_cannot_carry() -> None:
    assert podman_env_file({"A": "1", "B_2": "x=y --privileged"}) == \
        "A=1\nB_2=x=y --privileged\n"
    with pytest.raises(BadRequest, match="holds a line break"):
        podman_env_file({"A": "one\nB=two"})
    for name in ("-A", "A-B", "1A", "A B"):
        with pytest.raises(BadRequest, match="cannot be passed into a container"):
            podman_env_file({name: "x"})
