"""fetchml audit verify/show: check the audit log's hash chain, or read its last entries."""

from __future__ import annotations

import json

import click

from fetchml.cli.context import CliContext, json_option, pass_cli
from fetchml.protocol import ops


@click.group()
def audit() -> None:
    """The daemon's tamper-evident audit log (admin)."""


@audit.command()
@json_option
@pass_cli
def verify(cli: CliContext) -> None:
    """Check every line's hash chain; exit 1 and name the first bad line if it is broken."""
    result = cli.connect().call(ops.ADMIN_AUDIT.name, {"verify": True, "tail": 0})
    result.pop("entries", None)
    if cli.as_json:
        cli.emit_json(result)
    elif result["ok"]:
        cli.say(f"audit log intact: {result['lines']} lines in {len(result['files'])} files")
    else:
        cli.say(f"audit log BROKEN at {result['bad_file']} line {result['bad_line']}: "
                f"{result['reason']}")
    if not result["ok"]:
        raise SystemExit(1)


@audit.command()
@click.option("--tail", default=20, show_default=True, type=click.IntRange(0, 10_000),
              help="How many recent entries.")
@json_option
@pass_cli
def show(cli: CliContext, tail: int) -> None:
    """Print the last entries."""
    entries = cli.connect().call(ops.ADMIN_AUDIT.name, {"verify": False, "tail": tail})["entries"]
    if cli.as_json:
        cli.emit_json({"entries": entries})
        return
    for entry in entries:
        details = json.dumps(entry.get("details") or {}, ensure_ascii=True)
        cli.say(f"{entry['time']}  {entry['event']:<18} {entry.get('user') or '-':<12} "
                f"{entry.get('peer') or '-':<22} {details}")
