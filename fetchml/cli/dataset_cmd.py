"""fetchml dataset push / list / info / rm: named, versioned data for jobs.

A push is a sync of PATH (same scanner, ignore rules, stat cache and deduplication: only what
the daemon lacks is sent) recorded as the next version of NAME. Jobs read a version with
``fetchml queue --dataset NAME[@V][:MOUNT]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fetchml.cli.context import CliContext, json_option, pass_cli, render_table
from fetchml.cli.jobs_view import rfc3339
from fetchml.cli.sync_cmd import progress_bar
from fetchml.client.transfer import sync_tree
from fetchml.config import parse_bytes
from fetchml.errors import BadRequest
from fetchml.protocol import ops_datasets
from fetchml.protocol.ops_datasets import check_name, parse_ref
from fetchml.units import human_bytes

# Data files are large on purpose: a push refuses only files beyond this unless told otherwise
# (a sync's default limit is meant to catch stray checkpoints, not training data).
PUSH_MAX_FILE_SIZE = 1 << 40


def version_json(version: dict[str, Any]) -> dict[str, Any]:
    """A version as --json prints it: pushed_at in RFC 3339 UTC."""
    return {**version, "pushed_at": rfc3339(version.get("pushed_at"))}


def _row(version: dict[str, Any]) -> list[str]:
    return [str(version["version"]), version["snapshot"][:12], str(version["files"]),
            human_bytes(version["bytes"]), version["pushed_by"],
            rfc3339(version["pushed_at"]) or "-",
            ("cached " if version.get("cached") else "") +
            ("(being removed) " if version.get("state") == "removing" else "") +
            (version.get("description") or "")]


@click.group()
def dataset() -> None:
    """Push, list, inspect or remove named datasets."""


@dataset.command()
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--description", "-m", default="", help="What this version holds.")
@click.option("--max-file-size", metavar="SIZE",
              help="Refuse files larger than this (default 1T).")
@json_option
@pass_cli
def push(cli: CliContext, name: str, path: Path, description: str,
         max_file_size: str | None) -> None:
    """Upload PATH (only what the daemon lacks) as the next version of dataset NAME."""
    try:
        check_name(name)
        limit = parse_bytes(max_file_size) if max_file_size else PUSH_MAX_FILE_SIZE
    except (BadRequest, ValueError) as exc:
        raise click.BadParameter(str(exc)) from exc
    conn = cli.connect()
    report = sync_tree(conn, path.resolve(), max_file_size=limit, progress=progress_bar(cli))
    result = conn.call(ops_datasets.DATASETS_PUSH.name,
                       {"name": name, "snapshot": report.snapshot, "description": description})
    if cli.as_json:
        cli.emit_json({**version_json(result), "sent_files": report.sent_files,
                       "sent_bytes": report.sent_bytes})
        return
    sent = f"sent {report.sent_files} files, {human_bytes(report.sent_bytes)}"
    what = (f"{result['files']} files, {human_bytes(result['bytes'])}, snapshot "
            f"{result['snapshot'][:12]}")
    if result["created"]:
        cli.say(f"pushed {name}@{result['version']}  ({what}; {sent})")
    else:
        cli.say(f"{name}@{result['version']} is unchanged ({what}; {sent}); no new version")


@dataset.command(name="list")
@json_option
@pass_cli
def list_(cli: CliContext) -> None:
    """Every dataset: owner, number of versions, latest version."""
    found = cli.connect().call(ops_datasets.DATASETS_LIST.name)["datasets"]
    if cli.as_json:
        cli.emit_json({"datasets": [{**d, "latest": version_json(d["latest"])} for d in found]})
        return
    rows = [[d["name"], d["owner"] or "-", str(d["versions"]), str(d["latest"]["version"]),
             str(d["latest"]["files"]), human_bytes(d["latest"]["bytes"]),
             rfc3339(d["latest"]["pushed_at"]) or "-"] for d in found]
    cli.say(render_table(["name", "owner", "versions", "latest", "files", "size", "pushed"],
                         rows) if rows else "no datasets; `fetchml dataset push NAME PATH` "
            "adds one")


def _name_argument(text: str) -> str:
    try:
        parse_ref(text, allow_mount=False)
    except BadRequest as exc:
        raise click.BadParameter(exc.message) from exc
    return text


@dataset.command()
@click.argument("name")
@json_option
@pass_cli
def info(cli: CliContext, name: str) -> None:
    """Versions of dataset NAME (or only NAME@VERSION)."""
    result = cli.connect().call(ops_datasets.DATASETS_INFO.name, {"name": _name_argument(name)})
    if cli.as_json:
        cli.emit_json({**result, "versions": [version_json(v) for v in result["versions"]]})
        return
    cli.say(f"dataset {result['name']}  owner {result['owner']}")
    cli.say(render_table(["version", "snapshot", "files", "size", "pushed by", "pushed",
                          "description"], [_row(v) for v in result["versions"]]))


@dataset.command()
@click.argument("name")
@json_option
@pass_cli
def rm(cli: CliContext, name: str) -> None:
    """Remove NAME@VERSION, or every version of NAME; refused while jobs use it."""
    result = cli.connect().call(ops_datasets.DATASETS_RM.name, {"name": _name_argument(name)})
    if cli.as_json:
        cli.emit_json({**result, "removed": [version_json(v) for v in result["removed"]]})
        return
    refs = ", ".join(f"{v['name']}@{v['version']}" for v in result["removed"])
    cli.say(f"removed {refs}; `fetchml prune` frees the space of data no longer used")
