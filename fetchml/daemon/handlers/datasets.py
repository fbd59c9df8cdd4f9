"""datasets ops (registered with @handles; see fetchml/protocol/ops_datasets.py)."""

from __future__ import annotations
