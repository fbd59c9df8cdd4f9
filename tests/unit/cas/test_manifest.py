from __future__ import annotations

import msgpack
import pytest

from fetchml.cas.hashing import hash_bytes
from fetchml.cas.manifest import FORMAT_TAG, ManifestEntry, SnapshotManifest
from fetchml.errors import BadRequest
from tests.unit.cas.cas_helpers import encode_rows

OID_A = hash_bytes(b"a")
OID_B = hash_bytes(b"b")
RAW_A = bytes.fromhex(OID_A)


def sample() -> SnapshotManifest:
    return SnapshotManifest(
        [
            ManifestEntry.file("src/train.py", OID_A, 1),
            ManifestEntry.file("run.sh", OID_B, 1, executable=True),
            ManifestEntry.link("latest", "src/train.py"),
            ManifestEntry.dir("outputs"),
            ManifestEntry.file("src/b.py", OID_A, 1),
        ]
    )


def file_row(
    path: str, raw_oid: object = RAW_A, size: object = 1, executable: object = False
) -> list[object]:
    return [path, "file", executable, size, raw_oid, None]


def test_entries_are_sorted_by_utf8_bytes() -> None:
    paths = ["b", "a/z", "a.b", "a/b", "é", "z", "A"]
    manifest = SnapshotManifest(ManifestEntry.file(p, OID_A, 1) for p in paths)
    assert [e.path for e in manifest.entries] == sorted(paths, key=lambda p: p.encode())
    # '.' (0x2e) sorts before '/' (0x2f): "a.b" comes before the contents of "a/".
    assert [e.path for e in manifest.entries][:4] == ["A", "a.b", "a/b", "a/z"]


def test_round_trip_and_summary() -> None:
    manifest = sample()
    data = manifest.encode()
    decoded = SnapshotManifest.decode(data)
    assert decoded == manifest
    assert decoded.encode() == data
    assert decoded.snapshot_id == manifest.snapshot_id == hash_bytes(data)
    assert manifest.file_count == 3
    assert manifest.total_bytes == 3
    assert manifest.oids() == {OID_A, OID_B}
    assert len(manifest) == 5


def test_encoding_is_a_versioned_list_without_maps() -> None:
    document = msgpack.unpackb(sample().encode(), raw=False)
    assert document[0] == FORMAT_TAG and document[1] == 1
    assert ["latest", "link", False, 0, None, "src/train.py"] in document[2]
    assert ["outputs", "dir", False, 0, None, None] in document[2]
    assert ["src/train.py", "file", False, 1, RAW_A, None] in document[2]


def test_same_entries_in_any_order_give_the_same_id() -> None:
    entries = list(sample().entries)
    assert SnapshotManifest(reversed(entries)).snapshot_id == sample().snapshot_id


def test_exec_bit_and_link_target_change_the_id() -> None:
    base = SnapshotManifest([ManifestEntry.file("f", OID_A, 1), ManifestEntry.link("l", "f")])
    executable = SnapshotManifest(
        [ManifestEntry.file("f", OID_A, 1, executable=True), ManifestEntry.link("l", "f")]
    )
    retargeted = SnapshotManifest([ManifestEntry.file("f", OID_A, 1), ManifestEntry.link("l", "g")])
    assert len({base.snapshot_id, executable.snapshot_id, retargeted.snapshot_id}) == 3


@pytest.mark.parametrize(
    ("rows", "named"),
    [
        ([file_row("../etc/passwd")], "../etc/passwd"),
        ([file_row("a/../b")], "a/../b"),
        ([file_row("/etc/passwd")], "/etc/passwd"),
        ([file_row("a\x00b")], "a\\x00b"),
        ([file_row("a\\b")], "a\\\\b"),
        ([file_row("x" * 256)], "x" * 256),
        ([file_row("a//b")], "a//b"),
        ([file_row("./a")], "./a"),
        ([file_row("")], "''"),
        ([file_row("cafe\u0301")], "cafe\u0301"),
        ([file_row("dup"), file_row("dup")], "dup"),
        ([file_row("b"), file_row("a")], "'a'"),
        ([["l", "link", False, 0, None, "../outside"]], "'l'"),
        ([["d/l", "link", False, 0, None, "../../outside"]], "'d/l'"),
        ([["l", "link", False, 0, None, "/etc"]], "'l'"),
        ([["l", "link", False, 0, None, ""]], "'l'"),
        ([file_row("f", raw_oid=b"short")], "'f'"),
        ([file_row("f", raw_oid=None)], "'f'"),
        ([file_row("f", raw_oid=OID_A)], "'f'"),  # hex text instead of raw bytes
        ([file_row("f", size=-1)], "'f'"),
        ([file_row("f", size=1.0)], "'f'"),
        ([file_row("f", executable=1)], "'f'"),
        ([["f", "fifo", False, 0, None, None]], "'f'"),
        ([file_row("f"), file_row("f/under")], "'f/under'"),
        ([["l", "link", False, 0, None, "x"], file_row("l/under")], "'l/under'"),
        ([["d", "dir", False, 0, None, None], file_row("d/x")], "'d'"),
        ([["l", "link", False, 5, None, "x"]], "'l'"),
        ([["d", "dir", True, 0, None, None]], "'d'"),
        ([["d", "dir", False, 0, None, "x"]], "'d'"),
    ],
)
def test_decode_refuses_bad_entries_naming_them(rows: list[list[object]], named: str) -> None:
    with pytest.raises(BadRequest) as caught:
        SnapshotManifest.decode(encode_rows(rows))
    assert named in caught.value.message


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        msgpack.packb({"entries": []}),
        msgpack.packb([FORMAT_TAG, 2, []]),
        msgpack.packb([FORMAT_TAG, True, []]),
        msgpack.packb(["other.format", 1, []]),
        msgpack.packb([FORMAT_TAG, 1, [["short row"]]]),
        msgpack.packb([FORMAT_TAG, 1, [{"path": "a"}]]),
        msgpack.packb([FORMAT_TAG, 1, [[1, "file", False, 1, RAW_A, None]]]),
        msgpack.packb([FORMAT_TAG, 1, []]) + b"\x00",
        msgpack.packb([FORMAT_TAG, 1, [[b"a", "file", False, 1, RAW_A, None]]]),
    ],
)
def test_decode_refuses_malformed_documents(data: bytes) -> None:
    with pytest.raises(BadRequest):
        SnapshotManifest.decode(data)


def test_decode_refuses_non_canonical_encodings() -> None:
    canonical = encode_rows([file_row("f")])
    assert SnapshotManifest.decode(canonical).encode() == canonical
    # The same values with the size packed as a 64-bit integer instead of a fixint.
    padded = canonical.replace(b"\xc2\x01\xc4", b"\xc2\xcf" + (1).to_bytes(8, "big") + b"\xc4")
    assert padded != canonical and msgpack.unpackb(padded) == msgpack.unpackb(canonical)
    with pytest.raises(BadRequest, match="canonical"):
        SnapshotManifest.decode(padded)


def test_constructor_refuses_unsafe_paths_and_duplicates() -> None:
    for bad in ["..", "/abs", "a\\b", "a//b", "cafe\u0301"]:
        with pytest.raises(BadRequest, match="snapshot entry"):
            SnapshotManifest([ManifestEntry.file(bad, OID_A, 1)])
    with pytest.raises(BadRequest, match="twice"):
        SnapshotManifest([ManifestEntry.file("x", OID_A, 1), ManifestEntry.dir("x")])
    with pytest.raises(BadRequest, match="under"):
        SnapshotManifest([ManifestEntry.file("x", OID_A, 1), ManifestEntry.file("x/y", OID_A, 1)])
    with pytest.raises(BadRequest, match="empty directory"):
        SnapshotManifest([ManifestEntry.dir("x"), ManifestEntry.file("x/y", OID_A, 1)])
    with pytest.raises(BadRequest, match="object id"):
        SnapshotManifest([ManifestEntry.file("x", "nothex", 1)])


def test_constructor_keeps_escaping_links_but_decode_refuses_them() -> None:
    manifest = SnapshotManifest([ManifestEntry.link("l", "../../etc/passwd")])
    with pytest.raises(BadRequest, match="outside"):
        SnapshotManifest.decode(manifest.encode())


def test_empty_manifest() -> None:
    manifest = SnapshotManifest([])
    assert SnapshotManifest.decode(manifest.encode()) == manifest
    assert manifest.file_count == 0 and manifest.total_bytes == 0 and manifest.oids() == set()
