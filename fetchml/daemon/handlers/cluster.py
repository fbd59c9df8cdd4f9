"""cluster.*: the hosts of the cluster, and bringing a job's outputs to this daemon."""

from __future__ import annotations

import time
from typing import Any

from fetchml.daemon.handlers import Call, handles
from fetchml.daemon.handlers.jobs import visible_job
from fetchml.daemon.jobs.model import TERMINAL_STATES
from fetchml.errors import Conflict, NotFound, Unavailable
from fetchml.protocol import ops_cluster
from fetchml.protocol.schema import NoArgs


@handles(ops_cluster.CLUSTER_HOSTS)
async def cluster_hosts(call: Call[NoArgs]) -> dict[str, Any]:
    core = call.core
    cluster = core.cluster
    if cluster is None:  # a daemon on its own store is a cluster of one
        free = (await core.host_status())["free"]
        resources = {k: v for k, v in core.inventory.to_dict().items() if k != "name"}
        host = {"name": core.settings.name, "address": core.listen_url,
                "resources": resources, "free": free, "last_seen": time.time(), "age": 0.0,
                "alive": True}
        return {"hosts": [host], "self": core.settings.name}
    try:
        await cluster.refresh_hosts()
        cluster.server_now = await cluster.registry.server_time()
    except Unavailable:
        pass  # the hosts as last heard of: still useful while Redis is away
    return {"hosts": cluster.describe_hosts(), "self": cluster.name}


@handles(ops_cluster.CLUSTER_OUTPUTS)
async def cluster_outputs(call: Call[ops_cluster.ClusterOutputsArgs]) -> dict[str, Any]:
    job = await visible_job(call, call.args["job"])
    if job.state not in TERMINAL_STATES:
        raise Conflict(f"job {job.id} is {job.state.value}; its outputs arrive when it ends "
                       f"(`fetchml wait {job.id}`)")
    if not job.outputs:
        raise NotFound(f"job {job.id} has no outputs: it wrote nothing to $FETCHML_OUTPUT_DIR")
    report = None
    if call.core.cluster is not None:
        report = await call.core.cluster.fetch_outputs(job)
    elif not call.core.snapshots.contains(job.outputs):
        raise NotFound(f"the outputs of job {job.id} are gone from this host (pruned?)")
    return {"job": job.id, "snapshot": job.outputs,
            "objects": report.objects if report else 0,
            "bytes": report.bytes if report else 0,
            "source": report.source if report else None}
