"""fetchml tui: the live terminal dashboard (Textual is imported only here)."""

from __future__ import annotations

import click

from fetchml.cli.context import CliContext, pass_cli
from fetchml.client import Connection, connect
from fetchml.errors import ConfigError


@click.command()
@click.option("--mine", is_flag=True, help="Only my jobs (default: everyone's, where my role "
              "allows it).")
@pass_cli
def tui(cli: CliContext, mine: bool) -> None:
    """A live dashboard: jobs, GPUs, a job's output and its metrics plot.

    Keys: c cancel (asks first), r re-queue, p pull outputs, s/u/a filter by state, user,
    everyone, o sort, / search the output, f follow, m next metric, q quit.
    """
    try:
        from fetchml.cli.tui.app import Dashboard
    except ImportError as exc:
        raise ConfigError(f"fetchml tui needs the textual package ({exc}); install it with "
                          "`pip install textual`") from exc
    first = [cli.connect()]  # fails (or asks for a key) before the screen is taken over

    def reconnect() -> Connection:
        if first:
            return first.pop()
        settings = cli.settings
        return connect(cli.target(), api_key=settings.api_key,
                       timeout=settings.connect_timeout,
                       ca_file=str(settings.ca_file) if settings.ca_file else None)

    app = Dashboard(reconnect, pull_dir=cli.cwd, all_users=not mine)
    try:
        app.run()
    finally:
        app.feeds.stop()
