"""metrics ops (registered with @handles; see fetchml/protocol/ops_metrics.py)."""

from __future__ import annotations
