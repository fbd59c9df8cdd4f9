"""fetchml sync: snapshot the project and upload only what the daemon lacks."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from fetchml.cli.context import CliContext, json_option, pass_cli
from fetchml.client.transfer import Progress, SyncReport, sync_tree
from fetchml.config import find_project_root
from fetchml.units import human_bytes

# Below this many bytes to send, a progress bar is only noise.
PROGRESS_MIN_BYTES = 8 * 1024 * 1024


def project_root(cli: CliContext, path: Path | None) -> Path:
    if path is not None:
        return path.resolve()
    return find_project_root(cli.cwd) or cli.cwd


def progress_bar(cli: CliContext) -> Progress | None:
    """A one-line progress display on a terminal; None when output is not a terminal."""
    if cli.as_json or cli.verbosity < 0 or not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(sent: int, total: int) -> None:
        now = time.monotonic()
        if total < PROGRESS_MIN_BYTES or (now - last[0] < 0.1 and sent < total):
            return
        last[0] = now
        end = "\n" if sent >= total else ""
        sys.stderr.write(f"\rsending {human_bytes(sent)} / {human_bytes(total)} "
                         f"({100 * sent // max(total, 1)}%){end}")
        sys.stderr.flush()

    return show


def run_sync(cli: CliContext, root: Path, *, dry_run: bool = False) -> SyncReport:
    return sync_tree(cli.connect(), root, max_file_size=cli.settings.max_file_size,
                     dry_run=dry_run, progress=progress_bar(cli))


def describe(report: SyncReport, dry_run: bool = False) -> str:
    verb = "would send" if dry_run else "sent"
    return (f"snapshot {report.snapshot[:12]}  {report.files} files, "
            f"{human_bytes(report.bytes)}; {verb} {report.sent_files} files, "
            f"{human_bytes(report.sent_bytes)}")


@click.command()
@click.argument("path", required=False, type=click.Path(exists=True, file_okay=False,
                                                         path_type=Path))
@click.option("--dry-run", is_flag=True, help="Show what would be sent; send nothing.")
@json_option
@pass_cli
def sync(cli: CliContext, path: Path | None, dry_run: bool) -> None:
    """Snapshot PATH (default: the project) and upload what the daemon lacks."""
    report = run_sync(cli, project_root(cli, path), dry_run=dry_run)
    if cli.as_json:
        cli.emit_json({**report.to_json(), "dry_run": dry_run})
    else:
        cli.say(describe(report, dry_run))
