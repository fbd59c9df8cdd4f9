"""fetchml info: the daemon, who you are, the host's CPUs, memory and GPUs; with --cluster,
every host of the cluster."""

from __future__ import annotations

from typing import Any

import click

from fetchml.cli.context import CliContext, json_option, pass_cli, render_table
from fetchml.cli.jobs_view import rfc3339
from fetchml.protocol import ops, ops_cluster
from fetchml.units import human_bytes


@click.command()
@click.option("--cluster", "cluster", is_flag=True,
              help="List every host of the cluster instead (name, address, resources).")
@json_option
@pass_cli
def info(cli: CliContext, cluster: bool) -> None:
    """Show the daemon, who you are, and the host's resources."""
    conn = cli.connect()
    if cluster:
        _cluster(cli, conn.call(ops_cluster.CLUSTER_HOSTS.name))
        return
    result = conn.call(ops.HOST_INFO.name)
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


def _cluster(cli: CliContext, result: dict[str, Any]) -> None:
    hosts = [{**host, "last_seen": rfc3339(host.get("last_seen"))} for host in result["hosts"]]
    if cli.as_json:
        cli.emit_json({"hosts": hosts})
        return
    rows = []
    for host in result["hosts"]:
        res, free = host.get("resources") or {}, host.get("free") or {}
        gpus = len(res.get("gpus") or ())
        state = "alive" if host.get("alive") else f"silent {host.get('age', 0):.0f}s"
        name = host["name"] + (" *" if host["name"] == result.get("self") else "")
        rows.append([name, host.get("address") or "-", state,
                     f"{free.get('cpus', '?')}/{res.get('cpus', '?')}",
                     f"{human_bytes(free.get('memory'))}/{human_bytes(res.get('memory'))}",
                     f"{len(free.get('gpus') or ())}/{gpus}"])
    cli.say(render_table(["HOST", "ADDRESS", "STATE", "CPUS FREE", "MEMORY FREE", "GPUS FREE"],
                         rows))
