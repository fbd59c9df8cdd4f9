"""The on-disk layout of an object store: ``root/ab/cdef…`` plus ``.tmp-*`` staging files."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

from fetchml.cas.hashing import are_oids, is_oid
from fetchml.errors import BadRequest

TEMP_PREFIX = ".tmp-"
# Two hex digits of fan-out: 256 directories keep each one small for millions of objects.
FANOUT_LEN = 2
_HEX = frozenset("0123456789abcdef")


def check_oid(oid: str) -> None:
    if not is_oid(oid):
        raise BadRequest(f"{oid!r} is not an object id; object ids are 64 lowercase hex digits")


def check_oids(oids: Sequence[str]) -> None:
    """check_oid for many ids at once; the one-by-one check names the first bad one."""
    if not are_oids(oids):
        for oid in oids:
            check_oid(oid)


class StoreFile(NamedTuple):
    """One directory entry of a store, as a scan of its layout sees it."""

    path: Path
    kind: Literal["object", "temp", "stray"]
    oid: str | None


def iter_store_files(root: Path) -> Iterator[StoreFile]:
    """Every entry under a store root: objects, leftover temp files, and anything else (stray)."""
    try:
        top = sorted(os.scandir(root), key=lambda entry: entry.name)
    except FileNotFoundError:
        return
    for entry in top:
        if entry.name.startswith(TEMP_PREFIX):
            yield StoreFile(Path(entry.path), "temp", None)
            continue
        fanout = len(entry.name) == FANOUT_LEN and _HEX.issuperset(entry.name)
        if not fanout or not entry.is_dir(follow_symlinks=False):
            yield StoreFile(Path(entry.path), "stray", None)
            continue
        try:
            children = sorted(os.scandir(entry.path), key=lambda item: item.name)
        except FileNotFoundError:
            continue
        for child in children:
            oid = entry.name + child.name
            if child.name.startswith(TEMP_PREFIX):
                yield StoreFile(Path(child.path), "temp", None)
            elif is_oid(oid) and child.is_file(follow_symlinks=False):
                yield StoreFile(Path(child.path), "object", oid)
            else:
                yield StoreFile(Path(child.path), "stray", None)
