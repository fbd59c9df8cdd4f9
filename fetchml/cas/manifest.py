"""Snapshot manifests: the canonical, content-addressed description of a project tree.

Encoding (msgpack, lists only, no floats, no timestamps)::

    ["fetchml.snapshot", 1, [[path, kind, executable, size, oid, target], ...]]

``oid`` is the 32 raw digest bytes for files and nil otherwise; ``target`` is the link target
for links and nil otherwise; links and directories have ``executable`` false and ``size`` 0.
Entries are sorted by the UTF-8 bytes of their path. Only empty directories get an entry.
The same tree gives the same bytes on any machine, so the blake3 of the encoding (the
snapshot id) names the tree.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from fetchml.cas.hashing import hash_bytes, is_oid
from fetchml.cas.paths import link_target_problem, path_problem
from fetchml.errors import BadRequest

FORMAT_TAG = "fetchml.snapshot"
FORMAT_VERSION = 1
KINDS = ("file", "link", "dir")
_ROW_FIELDS = 6
_DIGEST_BYTES = 32

EntryKind = Literal["file", "link", "dir"]


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One file, symlink or empty directory of a snapshot."""

    path: str
    kind: EntryKind
    executable: bool = False
    size: int = 0
    oid: str | None = None
    target: str | None = None

    @classmethod
    def file(cls, path: str, oid: str, size: int, *, executable: bool = False) -> ManifestEntry:
        return cls(path, "file", executable, size, oid, None)

    @classmethod
    def link(cls, path: str, target: str) -> ManifestEntry:
        return cls(path, "link", False, 0, None, target)

    @classmethod
    def dir(cls, path: str) -> ManifestEntry:
        return cls(path, "dir", False, 0, None, None)


def _sort_key(entry: ManifestEntry) -> bytes:
    return entry.path.encode("utf-8")


def refuse_entry(path: str, problem: str) -> BadRequest:
    return BadRequest(
        f"snapshot entry {path!r} {problem}; rename it or add it to .fetchmlignore",
        details={"path": path},
    )


def entry_problem(entry: ManifestEntry, *, check_link: bool) -> str | None:
    """Why one entry is invalid on its own (ignoring its neighbours), or None."""
    problem = path_problem(entry.path)
    if problem is not None:
        return problem
    if entry.kind not in KINDS:
        return f"has the unknown kind {entry.kind!r}"
    if entry.kind == "file":
        if not isinstance(entry.oid, str) or not is_oid(entry.oid):
            return f"has the invalid object id {entry.oid!r}"
        if isinstance(entry.size, bool) or not isinstance(entry.size, int) or entry.size < 0:
            return f"has the invalid size {entry.size!r}"
        if not isinstance(entry.executable, bool) or entry.target is not None:
            return "is a file with link fields"
        return None
    if entry.oid is not None or entry.size != 0 or entry.executable is not False:
        return f"is a {entry.kind} with file fields"
    if entry.kind == "dir":
        return None if entry.target is None else "is a dir with a link target"
    if not isinstance(entry.target, str) or not entry.target or "\x00" in entry.target:
        return "is a link with an empty or invalid target"
    return link_target_problem(entry.path, entry.target) if check_link else None


def _check_tree(entries: Sequence[ManifestEntry]) -> None:
    """Refuse entries nested under a file, link or (non-empty) dir entry."""
    kinds = {entry.path: entry.kind for entry in entries}
    for entry in entries:
        end = entry.path.find("/")
        while end != -1:
            parent = entry.path[:end]
            kind = kinds.get(parent)
            if kind == "dir":
                raise refuse_entry(
                    parent, "is listed as an empty directory but has entries under it"
                )
            if kind is not None:
                raise refuse_entry(entry.path, f"is under {parent!r}, which is a {kind}")
            end = entry.path.find("/", end + 1)


class SnapshotManifest:
    """An immutable, validated, sorted list of entries with a canonical encoding."""

    __slots__ = ("_encoded", "_entries")

    def __init__(self, entries: Iterable[ManifestEntry]) -> None:
        """Validate and sort ``entries``; link targets are checked by decode, not here.

        A scan records a link that leaves the tree faithfully; the store refuses it when
        the manifest arrives (decode) and materialise refuses it too.
        """
        checked = list(entries)
        for entry in checked:
            problem = entry_problem(entry, check_link=False)
            if problem is not None:
                raise refuse_entry(entry.path if isinstance(entry.path, str) else "?", problem)
        checked.sort(key=_sort_key)
        for previous, current in itertools.pairwise(checked):
            if previous.path == current.path:
                raise refuse_entry(current.path, "appears twice")
        _check_tree(checked)
        self._entries: tuple[ManifestEntry, ...] = tuple(checked)
        self._encoded: bytes | None = None

    @property
    def entries(self) -> tuple[ManifestEntry, ...]:
        return self._entries

    def __iter__(self) -> Iterator[ManifestEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SnapshotManifest) and self._entries == other._entries

    def __hash__(self) -> int:
        return hash(self._entries)

    def __repr__(self) -> str:
        return f"SnapshotManifest({self.snapshot_id[:12]}, {len(self._entries)} entries)"

    @property
    def file_count(self) -> int:
        return sum(1 for entry in self._entries if entry.kind == "file")

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self._entries if entry.kind == "file")

    def oids(self) -> set[str]:
        return {entry.oid for entry in self._entries if entry.oid is not None}

    @property
    def snapshot_id(self) -> str:
        return hash_bytes(self.encode())

    def encode(self) -> bytes:
        if self._encoded is None:
            rows = [
                [
                    entry.path,
                    entry.kind,
                    entry.executable,
                    entry.size,
                    bytes.fromhex(entry.oid) if entry.oid is not None else None,
                    entry.target,
                ]
                for entry in self._entries
            ]
            self._encoded = msgpack.packb([FORMAT_TAG, FORMAT_VERSION, rows], use_bin_type=True)
        return self._encoded

    @classmethod
    def decode(cls, data: bytes) -> SnapshotManifest:
        """Parse and fully validate an encoded manifest (it may come from the network)."""
        try:
            document = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise BadRequest(
                f"the snapshot manifest is not valid msgpack ({exc}); take the snapshot again"
            ) from exc
        rows = _document_rows(document)
        entries = [_row_entry(index, row) for index, row in enumerate(rows)]
        for entry in entries:
            problem = entry_problem(entry, check_link=True)
            if problem is not None:
                raise refuse_entry(entry.path, problem)
        for previous, current in itertools.pairwise(entries):
            if previous.path == current.path:
                raise refuse_entry(current.path, "appears twice")
            if _sort_key(previous) > _sort_key(current):
                raise refuse_entry(
                    current.path, "is out of order (entries are sorted by UTF-8 bytes)"
                )
        manifest = cls.__new__(cls)
        _check_tree(entries)
        manifest._entries = tuple(entries)
        manifest._encoded = None
        if manifest.encode() != data:
            raise BadRequest(
                "the snapshot manifest is not in canonical form; take the snapshot again"
            )
        return manifest


def _document_rows(document: Any) -> list[Any]:
    if (
        not isinstance(document, list)
        or len(document) != 3
        or document[0] != FORMAT_TAG
        or not isinstance(document[2], list)
    ):
        raise BadRequest("the data is not a fetchml snapshot manifest; take the snapshot again")
    if document[1] != FORMAT_VERSION or isinstance(document[1], bool):
        raise BadRequest(
            f"snapshot manifest version {document[1]!r} is not supported; upgrade fetchml"
        )
    return document[2]


def _row_entry(index: int, row: Any) -> ManifestEntry:
    if not isinstance(row, list) or len(row) != _ROW_FIELDS or not isinstance(row[0], str):
        raise BadRequest(f"snapshot manifest entry {index} is malformed; take the snapshot again")
    path, kind, executable, size, raw_oid, target = row
    oid: Any = raw_oid
    if isinstance(raw_oid, bytes):
        if len(raw_oid) != _DIGEST_BYTES:
            raise refuse_entry(path, f"has an object id of {len(raw_oid)} bytes")
        oid = raw_oid.hex()
    elif raw_oid is not None:
        raise refuse_entry(path, f"has the invalid object id {raw_oid!r}")
    if not isinstance(kind, str):
        raise refuse_entry(path, f"has the unknown kind {kind!r}")
    if target is not None and not isinstance(target, str):
        raise refuse_entry(path, f"has the invalid link target {target!r}")
    return ManifestEntry(path, kind, executable, size, oid, target)  # type: ignore[arg-type]
