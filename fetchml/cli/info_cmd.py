"""fetchml info: the daemon, who you are, the host's CPUs, memory and GPUs."""

from __future__ import annotations

import click

from fetchml.cli.context import CliContext, human_bytes, json_option, pass_cli


@click.command()
@json_option
@pass_cli
def info(cli: CliContext) -> None:
    """Show the daemon, who you are, and the host's resources."""
    conn = cli.connect()
    result = conn.call("host.info")
    if cli.as_json:
        cli.emit_json(result)
        return
    host = result["host"]
    cli.say(f"daemon   {result['daemon']} (protocol {result['protocol']}) at "
            f"{conn.target.describe()}")
    cli.say(f"user     {result['user']} ({result['role']})")
    cli.say(f"host     {host['name']}: {host['cpus']} CPUs, {human_bytes(host['memory'])} memory, "
            f"{len(host['gpus'])} GPUs")
    for gpu in host["gpus"]:
        memory = human_bytes(gpu["memory"]) if gpu["memory"] else "memory unknown"
        cli.say(f"gpu {gpu['index']:<4} {gpu['name']}  {memory}  {gpu['uuid']}")
    free = result.get("free")
    if free:
        gpus = ",".join(str(g) for g in free["gpus"]) or "none"
        cli.say(f"free     {free['cpus']} CPUs, {human_bytes(free['memory'])} memory, "
                f"GPUs {gpus}")
