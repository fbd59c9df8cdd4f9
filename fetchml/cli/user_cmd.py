"""fetchml user add/list/revoke: API keys and roles (admin)."""

from __future__ import annotations

import click

from fetchml.cli.context import CliContext, json_option, pass_cli, render_table
from fetchml.cli.jobs_view import rfc3339
from fetchml.protocol import ops


@click.group()
def user() -> None:
    """Manage users and their API keys (admin)."""


@user.command()
@click.argument("name")
@click.option("--role", required=True, help="admin, researcher, analyst (or a configured role).")
@click.option("--uid", type=click.IntRange(0, 2**32 - 2),
              help="Local uid that maps to this user on the Unix socket.")
@json_option
@pass_cli
def add(cli: CliContext, name: str, role: str, uid: int | None) -> None:
    """Create NAME with a new API key, shown once."""
    result = cli.connect().call(ops.ADMIN_USERS_ADD.name, {"name": name, "role": role, "uid": uid})
    if cli.as_json:
        cli.emit_json(result)
        return
    cli.say(f"user {result['name']} ({result['role']}) created; their API key, shown only now:")
    cli.say(result["key"])
    cli.note("give it to them privately; they set FETCHML_API_KEY or run "
             "`fetchml init --save-key`")


@user.command(name="list")
@json_option
@pass_cli
def list_users(cli: CliContext) -> None:
    """List users (never their keys)."""
    users = cli.connect().call(ops.ADMIN_USERS_LIST.name)["users"]
    if cli.as_json:
        cli.emit_json({"users": users})
        return
    rows = [[u["name"], u["role"], str(u["uid"]) if u["uid"] is not None else "-",
             "yes" if u["has_key"] else "no", u["source"],
             "revoked " + (rfc3339(u["revoked_at"]) or "") if u["revoked_at"] else "active"]
            for u in users]
    cli.say(render_table(["name", "role", "uid", "key", "source", "status"], rows))


@user.command()
@click.argument("name")
@json_option
@pass_cli
def revoke(cli: CliContext, name: str) -> None:
    """Revoke NAME's key; their open sessions stop at their next request."""
    result = cli.connect().call(ops.ADMIN_USERS_REVOKE.name, {"name": name})
    if cli.as_json:
        cli.emit_json(result)
    else:
        cli.say(f"revoked {result['name']}")
