"""fetchml pin / unpin: keep a snapshot from garbage collection."""

from __future__ import annotations

import click

from fetchml.cli.context import CliContext, json_option, pass_cli, render_table
from fetchml.protocol import ops


@click.command()
@click.argument("snapshot", required=False)
@click.option("--list", "show", is_flag=True, help="List the pinned snapshots.")
@json_option
@pass_cli
def pin(cli: CliContext, snapshot: str | None, show: bool) -> None:
    """Keep SNAPSHOT and everything it names from garbage collection."""
    conn = cli.connect()
    if show or snapshot is None:
        pins = conn.call(ops.SNAPSHOT_PINS.name)["pins"]
        if cli.as_json:
            cli.emit_json({"pins": pins})
        else:
            cli.say(render_table(["snapshot", "pinned by"],
                                 [[p["snapshot"][:12], p["by"]] for p in pins]))
        return
    result = conn.call(ops.SNAPSHOT_PIN.name, {"snapshot": snapshot})
    if cli.as_json:
        cli.emit_json(result)
    else:
        cli.say(f"pinned {result['snapshot'][:12]}")


@click.command()
@click.argument("snapshot")
@json_option
@pass_cli
def unpin(cli: CliContext, snapshot: str) -> None:
    """Let garbage collection treat SNAPSHOT like any other again."""
    result = cli.connect().call(ops.SNAPSHOT_UNPIN.name, {"snapshot": snapshot})
    if cli.as_json:
        cli.emit_json(result)
    else:
        cli.say(f"unpinned {result['snapshot'][:12]}")
