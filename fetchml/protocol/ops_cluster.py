"""Ops of clusters: hosts, and daemon-to-daemon object transfer (see ops.py for the rest).

Daemons of one cluster talk to each other with the ordinary ops (``snapshot.get``,
``cas.get``, ``jobs.logs``), authenticated by the cluster secret as their Bearer key; the
ops here are what a cluster adds for users.
"""

from __future__ import annotations

from typing import Any, TypedDict

from fetchml.protocol.schema import Arg, NoArgs, OpSpec


class ClusterOutputsArgs(TypedDict):
    job: str

CLUSTER_HOSTS = OpSpec(
    "cluster.hosts",
    "Every host of the cluster this daemon belongs to (just this one for a daemon on its own "
    "store): its address, resources, free resources and when it was last heard from. A host "
    "silent longer than the lease timeout is not alive: its running jobs are run elsewhere.",
    result='{"hosts": [{"name", "address", "resources": {"cpus", "memory", "gpus": [gpu]}, '
    '"free": {"cpus", "memory", "gpus": [index]}, "last_seen" (epoch s), "age" (s), '
    '"alive"}], "self": name}',
    params=NoArgs, permissions=("host:read",),
)

CLUSTER_OUTPUTS = OpSpec(
    "cluster.outputs",
    "Makes this daemon hold a finished job's outputs, fetching them from the host that ran "
    "the job when they are not here, so that snapshot.get and cas.get can serve them.",
    args=(Arg("job", str, "job id", required=True),),
    result='{"job", "snapshot", "objects" (fetched), "bytes" (fetched), "source" (host or '
    "null when they were here)}",
    params=ClusterOutputsArgs, permissions=("jobs:read", "cas:read"),
)

OPS: tuple[OpSpec[Any], ...] = (CLUSTER_HOSTS, CLUSTER_OUTPUTS)
