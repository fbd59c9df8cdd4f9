"""Ops of job metrics: the series jobs write (see ops.py for the rest)."""

from __future__ import annotations

from fetchml.protocol.schema import OpSpec

OPS: tuple[OpSpec, ...] = ()
