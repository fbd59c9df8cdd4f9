"""fetchml config show: the merged settings and where each value came from."""

from __future__ import annotations

from pathlib import Path

import click

from fetchml.cli.context import CliContext, json_option, pass_cli, render_table
from fetchml.config import load_daemon_settings


@click.group()
def config() -> None:
    """Inspect settings."""


@config.command()
@click.option("--daemon-config", "for_daemon", is_flag=True,
              help="Show the settings a daemon started here would load (from --config, else "
                   "/etc/fetchml/daemon.yaml, and FETCHML_* variables) instead of the CLI's; "
                   "it does not ask a running daemon.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="Daemon config file (with --daemon-config).")
@json_option
@pass_cli
def show(cli: CliContext, for_daemon: bool, config_file: Path | None) -> None:
    """Print every setting, its value and its source (flag, env, file or default)."""
    loaded = (load_daemon_settings(env=cli.env, config_file=config_file) if for_daemon
              else cli.loaded)
    if cli.as_json:
        cli.emit_json(loaded.as_json())
        return
    cli.say(render_table(["setting", "value", "source"],
                         [list(row) for row in loaded.rows()]))
