"""Snapshots described as changes to a stored base: the same result as the whole manifest, and
the same refusals for changes that would make an invalid tree."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fetchml.cas import delta
from fetchml.cas.hashing import hash_bytes
from fetchml.cas.manifest import ManifestEntry, SnapshotManifest
from fetchml.errors import BadRequest


def f(path: str, content: str = "x") -> ManifestEntry:
    return ManifestEntry.file(path, hash_bytes(content.encode()), len(content))


BASE = SnapshotManifest([f("a.py"), f("pkg/m.py"), f("pkg/sub/n.py"), ManifestEntry.dir("empty"),
                         ManifestEntry.link("link", "a.py")])

names = st.sampled_from(["a.py", "b.py", "pkg/m.py", "pkg/x.py", "pkg/sub/n.py", "z/y/w.txt",
                         "ü.txt", "empty2"])
trees = st.dictionaries(names, st.text(max_size=3), max_size=8)


def manifest_of(tree: dict[str, str]) -> SnapshotManifest:
    return SnapshotManifest([f(path, content) for path, content in tree.items()])


@given(trees, trees)
def test_applying_the_diff_gives_the_new_manifest(old: dict[str, str],
                                                  new: dict[str, str]) -> None:
    base, target = manifest_of(old), manifest_of(new)
    upsert, remove = delta.diff(base, target)
    # The base as built, as read back from the store, and as decoded from the network: each
    # keeps its entries' rows differently.
    for start in (base, delta.load_stored(base.encode()), SnapshotManifest.decode(base.encode())):
        result = delta.apply(start, upsert, remove)
        assert result.encode() == target.encode()
        assert result.snapshot_id == target.snapshot_id


def test_a_one_file_edit_is_a_one_row_delta() -> None:
    edited = SnapshotManifest([f("a.py", "new"), *BASE.entries[1:]])
    upsert, remove = delta.diff(BASE, edited)
    assert [row[0] for row in upsert] == ["a.py"] and remove == []
    assert delta.worth_sending(BASE, upsert, remove)
    assert delta.apply(delta.load_stored(BASE.encode()), upsert, remove) == edited


@pytest.mark.parametrize(
    ("upsert", "remove", "named"),
    [
        ([delta.entry_row(f("a.py/inner"))], [], "a.py/inner"),  # under a file
        ([delta.entry_row(f("link/inner"))], [], "link/inner"),  # under a link
        ([delta.entry_row(f("empty/x"))], [], "empty"),  # under an empty-dir entry
        ([delta.entry_row(f("pkg"))], [], "pkg/m.py"),  # a file over a directory with entries
        ([delta.entry_row(ManifestEntry.dir("pkg"))], [], "pkg"),
        ([["../escape", "file", False, 1, bytes(32), None]], [], "../escape"),
        ([["bad\\path", "file", False, 1, bytes(32), None]], [], "bad\\path"),
        ([delta.entry_row(ManifestEntry.link("out", "../../etc"))], [], "out"),
        ([], ["not-there"], "not-there"),
    ],
)
def test_changes_that_make_an_invalid_tree_are_refused(upsert: list[object],
                                                       remove: list[str], named: str) -> None:
    with pytest.raises(BadRequest) as info:
        delta.apply(BASE, upsert, remove)
    assert named in str(info.value) or repr(named)[1:-1] in str(info.value)


def test_removing_the_blocker_then_adding_below_it_is_fine() -> None:
    result = delta.apply(BASE, [delta.entry_row(f("empty/now-full.txt"))], ["empty"])
    assert [e.path for e in result.entries] == ["a.py", "empty/now-full.txt", "link", "pkg/m.py",
                                                "pkg/sub/n.py"]
