from __future__ import annotations

import pytest

from fetchml.cas.paths import validate_link_target, validate_path
from fetchml.errors import BadRequest

BAD_PATHS = {
    "": "empty",
    "/etc/passwd": "absolute",
    "..": "'..'",
    "../x": "'..'",
    "a/../b": "'..'",
    "a/..": "'..'",
    ".": "'.'",
    "./a": "'.'",
    "a/./b": "'.'",
    "a//b": "empty component",
    "a/": "empty component",
    "a\x00b": "NUL",
    "a\\b": "backslash",
    "x" * 256: "longer than 255",
    "d/" + "é" * 128: "longer than 255",  # 256 bytes in UTF-8
    "/".join(["x" * 200] * 21): "longer than 4096",
    "cafe\u0301": "NFC",
    "bad\udcffname": "UTF-8",
}


@pytest.mark.parametrize(("path", "reason"), list(BAD_PATHS.items()))
def test_validate_path_refuses_unsafe_paths_naming_them(path: str, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason) as caught:
        validate_path(path)
    assert repr(path) in caught.value.message
    assert caught.value.details["path"] == path


@pytest.mark.parametrize(
    "path", ["a", "a/b/c", ".hidden", "a/.b", "..a", "a..", "café", "x" * 255, "é" * 127, "a b"]
)
def test_validate_path_accepts_safe_paths(path: str) -> None:
    assert validate_path(path) == path


@pytest.mark.parametrize(
    ("link", "target"),
    [
        ("l", "a"),
        ("l", "a/b/c"),
        ("d/l", "../x"),
        ("d/e/l", "../../x"),
        ("d/l", ".."),  # the tree's root is inside the tree
        ("l", "./a"),
        ("l", "."),
        ("d/l", "./../x"),
    ],
)
def test_link_targets_inside_the_tree_are_accepted(link: str, target: str) -> None:
    validate_link_target(link, target)


@pytest.mark.parametrize(
    ("link", "target", "reason"),
    [
        ("l", "/etc/passwd", "absolute"),
        ("l", "..", "outside"),
        ("d/l", "../..", "outside"),
        ("d/l", "../../etc", "outside"),
        ("l", "", "empty"),
        ("l", "a\x00b", "NUL"),
        # After a named component the kernel resolves '..' through whatever that name links
        # to, so no lexical check can vouch for it.
        ("l", "s/../..", "after a name"),
        ("d/l", "x/../y", "after a name"),
    ],
)
def test_link_targets_that_may_leave_the_tree_are_refused(
    link: str, target: str, reason: str
) -> None:
    with pytest.raises(BadRequest, match=reason) as caught:
        validate_link_target(link, target)
    assert repr(link) in caught.value.message
