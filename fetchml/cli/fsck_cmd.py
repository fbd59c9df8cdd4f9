"""fetchml fsck: check that every stored object and manifest is intact (admin)."""

from __future__ import annotations

import click

from fetchml.cli.context import CliContext, json_option, pass_cli, render_table
from fetchml.protocol import ops


@click.command()
@click.option("--read-data", is_flag=True, help="Re-hash every object (reads the whole store).")
@json_option
@pass_cli
def fsck(cli: CliContext, read_data: bool) -> None:
    """Check the object store; exit 1 if anything is wrong."""
    result = cli.connect().call(ops.ADMIN_FSCK.name, {"read_data": read_data})
    problems = result["problems"]
    if cli.as_json:
        cli.emit_json(result)
    else:
        cli.say(f"checked {result['objects']} objects and {result['snapshots']} snapshots"
                f"{' (data re-hashed)' if read_data else ''}: "
                f"{len(problems) or 'no'} problem{'s' if len(problems) != 1 else ''}")
        if problems:
            cli.say(render_table(["kind", "object", "problem"],
                                 [[p["kind"], p["oid"][:16], p["message"]] for p in problems]))
    if problems:
        raise SystemExit(1)
