"""Property: scan -> encode -> decode -> materialise -> scan keeps the snapshot id."""

from __future__ import annotations

import os
import tempfile
import unicodedata
from pathlib import Path
from typing import Union

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fetchml.cas.manifest import SnapshotManifest
from fetchml.cas.materialize import materialize
from fetchml.cas.objects import ObjectStore
from tests.unit.cas.cas_helpers import ingest, listing, scan

# A directory maps names to: bytes (file), ("exec", bytes), ("link", target), or a directory.
Node = Union[bytes, tuple[str, bytes], tuple[str, str], "Tree"]
Tree = dict[str, Node]

NAME_ALPHABET = st.sampled_from(
    [*"abcxyzABC019-_. ", "é", "ß", "ø", "中", "文", "🙂", "Ω", "\u0301", "ﬁ", "Å"]
)


def _usable(name: str) -> bool:
    return name not in (".", "..") and len(name.encode()) <= 255


names = (
    st.text(NAME_ALPHABET, min_size=1, max_size=12)
    .map(lambda name: unicodedata.normalize("NFC", name))
    .filter(_usable)
)


def link_targets(depth: int) -> st.SearchStrategy[str]:
    ups = st.integers(min_value=0, max_value=depth).map(lambda n: "../" * n)
    rest = st.lists(names, min_size=1, max_size=2).map("/".join)
    return st.builds(lambda up, tail: up + tail, ups, rest)


def trees(depth: int = 0) -> st.SearchStrategy[Tree]:
    leaves: st.SearchStrategy[Node] = st.one_of(
        st.binary(max_size=64),
        st.tuples(st.just("exec"), st.binary(max_size=64)),
        st.tuples(st.just("link"), link_targets(depth)),
    )
    children = st.one_of(leaves, st.deferred(lambda: trees(depth + 1))) if depth < 3 else leaves
    return st.dictionaries(names, children, max_size=5 if depth == 0 else 3)


def build(root: Path, tree: Tree) -> None:
    root.mkdir(exist_ok=True)
    for name, node in tree.items():
        path = root / name
        if isinstance(node, dict):
            build(path, node)
        elif isinstance(node, bytes):
            path.write_bytes(node)
        elif node[0] == "exec":
            assert isinstance(node[1], bytes)
            path.write_bytes(node[1])
            path.chmod(0o755)
        else:
            assert isinstance(node[1], str)
            os.symlink(node[1], path)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(tree=trees())
def test_scan_encode_decode_materialise_scan_round_trips(tree: Tree) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        source = base / "source"
        build(source, tree)
        store = ObjectStore(base / "objects")
        first = scan(source)
        ingest(store, first)
        decoded = SnapshotManifest.decode(first.manifest.encode())
        assert decoded == first.manifest
        materialize(decoded, store, base / "copy")
        second = scan(base / "copy")
        assert second.manifest.snapshot_id == first.manifest.snapshot_id
        # Names are generated NFC and none is ignored, so the copy is the source exactly.
        assert listing(base / "copy") == listing(source)
