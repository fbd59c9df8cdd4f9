"""fetchml pull: download a finished job's outputs."""

from __future__ import annotations

from pathlib import Path

import click

from fetchml.cli.context import CliContext, json_option, pass_cli
from fetchml.client.transfer import download_snapshot
from fetchml.errors import Conflict, NotFound
from fetchml.protocol import ops, ops_cluster
from fetchml.units import human_bytes


@click.command()
@click.argument("job")
@click.argument("dest", required=False, type=click.Path(path_type=Path))
@json_option
@pass_cli
def pull(cli: CliContext, job: str, dest: Path | None) -> None:
    """Download JOB's outputs into DEST (default ./outputs/JOB)."""
    conn = cli.connect()
    found = conn.call(ops.JOBS_GET.name, {"job": job})
    if found["state"] in ("held", "queued", "running"):
        raise Conflict(f"job {found['id']} is {found['state']}; its outputs arrive when it "
                       f"ends (`fetchml wait {found['id']}`)")
    if not found.get("outputs"):
        if found.get("outputs_error"):
            raise Conflict(f"job {found['id']}'s outputs are not stored: "
                           f"{found['outputs_error']}")
        raise NotFound(f"job {found['id']} has no outputs: it wrote nothing to "
                       "$FETCHML_OUTPUT_DIR")
    target = dest or cli.cwd / "outputs" / str(found["id"])
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise Conflict(f"{target} already exists and is not empty; choose another destination")
    # In a cluster the outputs are stored where the job ran: have this daemon fetch them.
    conn.call(ops_cluster.CLUSTER_OUTPUTS.name, {"job": str(found["id"])})
    manifest = download_snapshot(conn, found["outputs"], target)
    warnings = list(found.get("warnings") or ())
    summary = {"job": found["id"], "dest": str(target), "snapshot": found["outputs"],
               "files": manifest.file_count, "bytes": manifest.total_bytes,
               "warnings": warnings}
    if cli.as_json:
        cli.emit_json(summary)
    else:
        cli.say(f"pulled {manifest.file_count} files ({human_bytes(manifest.total_bytes)}) "
                f"into {target}")
        for warning in warnings:
            cli.note(f"warning: {warning}")
