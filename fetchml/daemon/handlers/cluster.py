"""cluster ops (registered with @handles; see fetchml/protocol/ops_cluster.py)."""

from __future__ import annotations
