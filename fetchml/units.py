"""Byte counts for people: one formatter for the CLI's tables and the messages of every part.

Standard library only, like ``errors``: ``cas``, ``client``, ``cli`` and the daemon all import
it. (The supervisor formats the limits it enforces with its own ``format_size``, in the
spelling ``--memory`` takes, and imports nothing of fetchml but ``errors``.)
"""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: int | float | None) -> str:
    """``1536`` -> ``1.5 KiB``; whole bytes below 1 KiB, TiB at most; None -> ``-``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in _UNITS[:-1]:
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {_UNITS[-1]}"
