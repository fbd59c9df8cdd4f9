"""fetchml demo: a real daemon in a temp dir, and the main flow against it, step by step."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click

from fetchml.cli.context import CliContext, pass_cli
from fetchml.client.local_daemon import LocalDaemon, clean_env
from fetchml.errors import DaemonUnreachable, FetchmlError, InternalError, Unavailable

DAEMON_START_TIMEOUT_S = 20.0
DAEMON_STOP_TIMEOUT_S = 15.0
DEMO_PROJECT = Path(__file__).resolve().parent.parent / "demo_project"
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class Demo:
    def __init__(self, workdir: Path, daemon: LocalDaemon) -> None:
        self.workdir, self.daemon = workdir, daemon

    def step(self, title: str, *args: str, cwd: Path | None = None) -> str:
        click.secho(f"\n== {title}", bold=True)
        click.secho(f"$ fetchml {' '.join(args)}", fg="cyan")
        done = self.daemon.cli(*args, cwd=cwd or self.workdir, timeout=None)
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
    env = clean_env()
    # `python -m fetchml` must find this very copy of fetchml, also from a .pyz or a venv that
    # is not activated.
    path = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=path)
    click.secho(f"fetchml demo in {workdir}", bold=True)
    daemon = LocalDaemon(workdir / "state", env, log_path=workdir / "daemon.log",
                         cwd=workdir, start_timeout=DAEMON_START_TIMEOUT_S)
    try:
        daemon.start()  # its log's tail is in the error if it does not start
        assert daemon.proc is not None
        click.echo(f"daemon started (pid {daemon.proc.pid}), socket {daemon.socket}")
        demo = Demo(workdir, daemon)
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
    except FetchmlError as exc:
        if not isinstance(exc, DaemonUnreachable):
            sys.stderr.write(daemon.log()[-4000:])
        raise
    finally:
        if daemon.running:
            with contextlib.suppress(Unavailable):  # killed after the timeout
                daemon.stop(timeout=DAEMON_STOP_TIMEOUT_S)
        if keep:
            click.echo(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
