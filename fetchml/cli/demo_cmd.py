"""fetchml demo: a real daemon in a temp dir, and the main flow against it, step by step."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from fetchml.cli.context import CliContext, pass_cli
from fetchml.errors import DaemonUnreachable, FetchmlError, InternalError

DAEMON_START_TIMEOUT_S = 20.0
DEMO_PROJECT = Path(__file__).resolve().parent.parent / "demo_project"
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _fetchml(*args: str) -> list[str]:
    return [sys.executable, "-m", "fetchml", *args]


def _wait_for_socket(sock: Path, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if sock.exists():
            return
        if daemon.poll() is not None:
            raise DaemonUnreachable("the demo daemon exited during start-up; its log is above")
        time.sleep(0.02)
    raise DaemonUnreachable(f"the demo daemon did not open {sock} within "
                            f"{DAEMON_START_TIMEOUT_S:g} s")


class Demo:
    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env

    def step(self, title: str, *args: str, cwd: Path | None = None) -> str:
        click.secho(f"\n== {title}", bold=True)
        click.secho(f"$ fetchml {' '.join(args)}", fg="cyan")
        done = subprocess.run(_fetchml(*args), cwd=cwd or self.workdir, env=self.env,
                              capture_output=True, text=True, check=False)
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        if done.returncode != 0:
            raise InternalError(f"demo step `fetchml {' '.join(args)}` failed with exit code "
                                f"{done.returncode}; see its output above")
        return done.stdout


@click.command()
@click.option("--keep", is_flag=True, help="Keep the temporary directory for a look around.")
@pass_cli
def demo(cli: CliContext, keep: bool) -> None:
    """Start a throwaway daemon and run the main flow against it (under a minute)."""
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="fetchml-demo-"))
    state_dir, sock = workdir / "state", workdir / "state" / "fetchml.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FETCHML_")}
    # `python -m fetchml` must find this very copy of fetchml, also from a .pyz or a venv that
    # is not activated.
    path = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env.update(FETCHML_SOCKET=str(sock), PYTHONUNBUFFERED="1", PYTHONPATH=path)
    click.secho(f"fetchml demo in {workdir}", bold=True)
    log_path = workdir / "daemon.log"
    with log_path.open("wb") as log_file:
        daemon = subprocess.Popen(
            _fetchml("daemon", "--state-dir", str(state_dir)),
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_socket(sock, daemon)
        click.echo(f"daemon started (pid {daemon.pid}), socket {sock}")
        demo = Demo(workdir, env)
        project = workdir / "project"
        shutil.copytree(DEMO_PROJECT, project, ignore=shutil.ignore_patterns("__pycache__"))
        demo.step("Who am I, and what does this host have?", "info")
        demo.step("Make the sample project a fetchml project", "init", cwd=project)
        demo.step("Snapshot the project and upload it", "sync", cwd=project)
        queued = demo.step("Queue a small learning-rate sweep (two jobs)", "queue",
                           "--grid", "lr=0.05,0.5", "--json", "--", "python3", "train.py",
                           "--lr", "{lr}", "--epochs", "15", cwd=project)
        jobs = [str(job["id"]) for job in json.loads(queued)["jobs"]]
        demo.step(f"Follow job {jobs[0]}'s output as it runs", "logs", "-f", jobs[0],
                  cwd=project)
        demo.step("Wait for the whole sweep", "wait", *jobs, cwd=project)
        demo.step("Compare the sweep's final metrics", "metrics", *jobs, cwd=project)
        demo.step(f"Pull job {jobs[-1]}'s outputs", "pull", jobs[-1],
                  str(workdir / "outputs"), cwd=project)
        click.echo((workdir / "outputs" / "model.json").read_text())
        demo.step("Show the jobs", "status", cwd=project)
        click.secho(f"\ndemo finished in {time.monotonic() - started:.1f} s", fg="green",
                    bold=True)
    except FetchmlError:
        sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
        raise
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
        if keep:
            click.echo(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
