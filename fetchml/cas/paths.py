"""The rules every path in a snapshot obeys, checked before anything is joined into a real path.

A snapshot path is relative, ``/``-separated, NFC-normalised UTF-8, with no empty, ``.`` or
``..`` component, no NUL or backslash, and no component longer than a filename may be.
"""

from __future__ import annotations

import unicodedata

from fetchml.errors import BadRequest

# NAME_MAX on Linux and most filesystems: the longest file name, in bytes.
MAX_COMPONENT_BYTES = 255
# PATH_MAX on Linux: longer paths break most tools, and the bound keeps nesting finite.
MAX_PATH_BYTES = 4096


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a safe snapshot path (a phrase), or None when it is."""
    if not path:
        return "is empty"
    if "\x00" in path:
        return "contains a NUL byte"
    if "\\" in path:
        return "contains a backslash"
    if path.startswith("/"):
        return "is absolute"
    if path.isascii() and len(path) <= MAX_PATH_BYTES:
        # Fast path for the common case (ASCII is valid UTF-8 and NFC): only the components
        # are left to check; any problem is worded by the full check below.
        components = path.split("/")
        if (
            "" not in components
            and "." not in components
            and ".." not in components
            and max(map(len, components)) <= MAX_COMPONENT_BYTES
        ):
            return None
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if len(encoded) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    for component in path.split("/"):
        if not component:
            return "has an empty component"
        if component in (".", ".."):
            return f"has a {component!r} component"
        if len(component.encode("utf-8")) > MAX_COMPONENT_BYTES:
            return f"has a component longer than {MAX_COMPONENT_BYTES} bytes"
    if not unicodedata.is_normalized("NFC", path):
        return "is not NFC-normalised"
    return None


def validate_path(path: str) -> str:
    """Return ``path`` unchanged if it is a safe snapshot path; BadRequest naming it otherwise."""
    problem = path_problem(path)
    if problem is not None:
        raise BadRequest(
            f"path {path!r} {problem}; snapshot paths are relative, '/'-separated and NFC",
            details={"path": path if isinstance(path, str) else repr(path)},
        )
    return path


def link_target_problem(link_path: str, target: str) -> str | None:
    """Why the symlink ``link_path -> target`` could point outside its tree, or None.

    ``..`` is resolved lexically from the link's directory. The kernel resolves a ``..`` that
    follows a named component physically, through whatever that component links to, so a
    lexical check could not vouch for it: ``..`` is accepted only at the start of the target.
    """
    if not isinstance(target, str) or not target:
        return "has an empty target"
    if "\x00" in target:
        return "has a target containing a NUL byte"
    if target.startswith("/"):
        return f"points to the absolute path {target!r}"
    depth = link_path.count("/")
    descended = False
    for component in target.split("/"):
        if component in ("", "."):
            continue
        if component != "..":
            descended = True
            continue
        if descended:
            return f"has '..' after a name in its target {target!r}"
        depth -= 1
        if depth < 0:
            return f"points outside the tree ({target!r})"
    return None


def validate_link_target(link_path: str, target: str) -> None:
    """BadRequest naming the link if its target is absolute or leaves the tree."""
    problem = link_target_problem(link_path, target)
    if problem is not None:
        raise BadRequest(
            f"symlink {link_path!r} {problem}; make it a relative link inside the project "
            "or add it to .fetchmlignore",
            details={"path": link_path},
        )
