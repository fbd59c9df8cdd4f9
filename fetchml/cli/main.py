"""The `fetchml` command: global options, lazy sub-commands, errors and exit codes.

Sub-command modules are imported only when that command runs, so `fetchml --help` and
`fetchml status` start fast; nothing here imports aiohttp or the daemon.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from fetchml import __version__
from fetchml.cli.context import CliContext
from fetchml.errors import FetchmlError

# name -> (module under fetchml.cli, attribute, one-line help shown by --help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "init": ("init_cmd", "init", "Set up this directory as a fetchml project."),
    "sync": ("sync_cmd", "sync", "Snapshot the project and upload what the daemon lacks."),
    "queue": ("queue_cmd", "queue", "Sync and queue a command as a job."),
    "watch": ("watch_cmd", "watch", "Sync on every change; with a command, re-queue it."),
    "status": ("status_cmd", "status", "Show jobs, or one job in detail."),
    "logs": ("logs_cmd", "logs", "Print or follow a job's output."),
    "wait": ("wait_cmd", "wait", "Wait until jobs end; exit 0 only if all succeeded."),
    "cancel": ("cancel_cmd", "cancel", "Cancel queued or running jobs."),
    "pull": ("pull_cmd", "pull", "Download a job's outputs."),
    "outputs": ("outputs_cmd", "outputs", "Store outputs a job left behind (a full disk)."),
    "prune": ("prune_cmd", "prune", "Delete old finished runs; garbage-collect the store."),
    "pin": ("pin_cmd", "pin", "Keep a snapshot from garbage collection."),
    "unpin": ("pin_cmd", "unpin", "Let garbage collection take a snapshot again."),
    "fsck": ("fsck_cmd", "fsck", "Check the daemon's object store."),
    "dataset": ("dataset_cmd", "dataset", "Push, list, inspect or remove named datasets."),
    "metrics": ("metrics_cmd", "metrics", "Training metrics of jobs; compare a sweep."),
    "tui": ("tui_cmd", "tui", "A live terminal dashboard of jobs, logs and metrics."),
    "user": ("user_cmd", "user", "Add, list or revoke users and their API keys (admin)."),
    "audit": ("audit_cmd", "audit", "Verify or show the audit log (admin)."),
    "info": ("info_cmd", "info", "Show the daemon, who you are, and the host's resources."),
    "config": ("config_cmd", "config", "Show the merged settings and where each came from."),
    "daemon": ("daemon_cmd", "daemon", "Run the daemon in the foreground."),
    "install-service": ("service_cmd", "install_service",
                        "Write a systemd unit for this installation."),
    "demo": ("demo_cmd", "demo", "Run the whole flow against a throwaway daemon."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._available(name)]

    @staticmethod
    def _available(name: str) -> bool:
        module = COMMANDS[name][0]
        return importlib.util.find_spec(f"fetchml.cli.{module}") is not None

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None or not self._available(cmd_name):
            return None
        module = importlib.import_module(f"fetchml.cli.{entry[0]}")
        command = getattr(module, entry[1])
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", metavar="PATH", help="Daemon's Unix socket.")
@click.option("--url", metavar="URL", help="Remote daemon, ws[s]://host:port.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (or JSON lines).")
@click.option("-v", "--verbose", count=True, help="More detail on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.version_option(__version__, prog_name="fetchml")
@click.pass_context
def cli(ctx: click.Context, socket_path: str | None, url: str | None, as_json: bool,
        verbose: int, quiet: bool) -> None:
    """fetchml: snapshot your code, queue it on your GPU boxes, get the results back."""
    if socket_path and url:
        raise click.UsageError("give either --socket or --url, not both")
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else
                                         logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    ctx.obj = CliContext(socket_path=socket_path, url=url, as_json=as_json,
                         verbosity=-1 if quiet else verbose, env=dict(os.environ),
                         cwd=Path.cwd())
    ctx.call_on_close(ctx.obj.close)


def main(argv: list[str] | None = None) -> Any:
    try:
        return cli.main(args=argv, prog_name="fetchml", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:  # click's form of Ctrl-C (and of EOF at a prompt)
        click.echo("interrupted", err=True)
        sys.exit(130)
    except FetchmlError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        # stdout closed early (`fetchml status | head`): not an error worth a traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
