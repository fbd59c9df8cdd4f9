"""Ops of datasets: named, versioned data (see ops.py for the rest)."""

from __future__ import annotations

from fetchml.protocol.schema import OpSpec

OPS: tuple[OpSpec, ...] = ()
