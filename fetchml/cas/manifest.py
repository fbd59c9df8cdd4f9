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
from typing import Any, Literal, NamedTuple

import msgpack

from fetchml.cas.hashing import are_oids, hash_bytes, is_oid
from fetchml.cas.paths import link_target_problem, path_problem
from fetchml.errors import BadRequest

FORMAT_TAG = "fetchml.snapshot"
FORMAT_VERSION = 1
KINDS = ("file", "link", "dir")
_ROW_FIELDS = 6
_DIGEST_BYTES = 32

EntryKind = Literal["file", "link", "dir"]


class ManifestEntry(NamedTuple):
    """One file, symlink or empty directory of a snapshot (a tuple: scans build thousands)."""

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
    # Every directory some entry lies in; entries share parents, so each is walked up once.
    implied: set[str] = set()
    for entry in entries:
        parent = entry.path.rpartition("/")[0]
        while parent and parent not in implied:
            implied.add(parent)
            parent = parent.rpartition("/")[0]
    if implied.isdisjoint(kinds):
        return
    for entry in entries:  # something is wrong: find the first offender, in order
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

    # _rows: the entries as msgpack rows, when known (decoded or built by a delta): encoding
    # from them skips converting every entry again.
    __slots__ = ("_encoded", "_entries", "_rows")

    def __init__(self, entries: Iterable[ManifestEntry]) -> None:
        """Validate and sort ``entries``; link targets are checked by decode, not here.

        A scan records a link that leaves the tree faithfully; the store refuses it when
        the manifest arrives (decode) and materialise refuses it too.
        """
        checked = list(entries)
        oids: list[str] = []
        clean = True
        for entry in checked:
            if _plain_file(entry):
                oids.append(entry.oid)  # type: ignore[arg-type]  # a str, checked just above
            elif entry_problem(entry, check_link=False) is not None:
                clean = False
                break
        if not clean or not are_oids(oids):  # name the first bad entry, in order
            for entry in checked:
                problem = entry_problem(entry, check_link=False)
                if problem is not None:
                    raise refuse_entry(entry.path if isinstance(entry.path, str) else "?", problem)
        checked.sort(key=_sort_key)
        _check_order(checked)
        _check_tree(checked)
        self._entries: tuple[ManifestEntry, ...] = tuple(checked)
        self._encoded: bytes | None = None
        self._rows: Sequence[Any] | None = None

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
        if self._encoded is None and self._rows is not None:
            self._encoded = msgpack.packb([FORMAT_TAG, FORMAT_VERSION, self._rows],
                                          use_bin_type=True)
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
        entries: list[ManifestEntry] = []
        unchecked: list[ManifestEntry] = []
        for index, row in enumerate(rows):
            entry = _valid_file_row(row)
            if entry is None:  # not a plain valid file: the general checks, in order
                entry = _row_entry(index, row)
                unchecked.append(entry)
            entries.append(entry)
        for entry in unchecked:
            problem = entry_problem(entry, check_link=True)
            if problem is not None:
                raise refuse_entry(entry.path, problem)
        _check_order(entries)
        _check_tree(entries)
        # The rows hold the very values the entries were built from (oids as raw bytes), so
        # packing them again is what encode() would write, at C speed.
        if msgpack.packb([FORMAT_TAG, FORMAT_VERSION, rows], use_bin_type=True) != data:
            raise BadRequest(
                "the snapshot manifest is not in canonical form; take the snapshot again"
            )
        manifest = cls.__new__(cls)
        manifest._entries = tuple(entries)
        manifest._encoded = bytes(data)
        manifest._rows = rows
        return manifest

    def summary(self) -> ManifestSummary:
        seen = dict.fromkeys(entry.oid for entry in self._entries if entry.oid is not None)
        return ManifestSummary(tuple(seen), self.file_count, self.total_bytes)


@dataclass(frozen=True, slots=True)
class ManifestSummary:
    """What storing a snapshot needs to know: its distinct objects, file count and size."""

    oids: tuple[str, ...]
    files: int
    bytes: int


def summarize_validated(data: bytes) -> ManifestSummary:
    """The summary of an encoding already validated by ``decode``, e.g. one whose digest names
    a stored snapshot (the same digest means the same bytes); skips the per-entry checks."""
    try:
        rows = _document_rows(msgpack.unpackb(data, raw=False, use_list=False))
        oids: dict[str, None] = {}
        files = total = 0
        for row in rows:
            if row[1] == "file":
                oids[row[4].hex()] = None
                files += 1
                total += row[3]
    except (ValueError, TypeError, IndexError, AttributeError, msgpack.UnpackException) as exc:
        raise BadRequest(
            "the snapshot manifest is malformed; take the snapshot again"
        ) from exc
    return ManifestSummary(tuple(oids), files, total)


def _document_rows(document: Any) -> Sequence[Any]:
    if (
        not isinstance(document, (list, tuple))
        or len(document) != 3
        or document[0] != FORMAT_TAG
        or not isinstance(document[2], (list, tuple))
    ):
        raise BadRequest("the data is not a fetchml snapshot manifest; take the snapshot again")
    if document[1] != FORMAT_VERSION or isinstance(document[1], bool):
        raise BadRequest(
            f"snapshot manifest version {document[1]!r} is not supported; upgrade fetchml"
        )
    return document[2]


def _valid_file_row(row: Any) -> ManifestEntry | None:
    """The entry of a row that is a valid file entry, else None (most rows of a manifest are;
    this accepts exactly what ``_row_entry`` + ``entry_problem`` accept, faster)."""
    if type(row) is not list or len(row) != _ROW_FIELDS:
        return None
    path, kind, executable, size, raw_oid, target = row
    if (
        kind == "file"
        and type(path) is str
        and type(raw_oid) is bytes
        and len(raw_oid) == _DIGEST_BYTES
        and type(size) is int
        and size >= 0
        and type(executable) is bool
        and target is None
        and path_problem(path) is None
    ):
        return ManifestEntry(path, "file", executable, size, raw_oid.hex(), None)
    return None


def _plain_file(entry: ManifestEntry) -> bool:
    """A file entry that ``entry_problem`` accepts, if its oid is an object id."""
    return (
        entry.kind == "file"
        and type(entry.path) is str
        and type(entry.oid) is str
        and type(entry.size) is int
        and entry.size >= 0
        and type(entry.executable) is bool
        and entry.target is None
        and path_problem(entry.path) is None
    )


def _check_order(entries: Sequence[ManifestEntry]) -> None:
    """Refuse entries that are not strictly sorted by the UTF-8 bytes of their paths."""
    keys = [_sort_key(entry) for entry in entries]
    if keys == sorted(keys) and len(set(keys)) == len(keys):
        return
    for previous, current in itertools.pairwise(entries):
        if previous.path == current.path:
            raise refuse_entry(current.path, "appears twice")
        if _sort_key(previous) > _sort_key(current):
            raise refuse_entry(current.path, "is out of order (entries are sorted by UTF-8 bytes)")


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
