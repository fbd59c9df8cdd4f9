"""Compiled ignore files, and a per-project cache of their translation to regexes.

pathspec implements gitignore's subtle semantics, but importing it and translating patterns
costs more than a warm scan of a 10,000-file project. A translation depends only on the lines
(and the pathspec release), so a project keeps them in ``.fetchml/ignorecache``. pathspec is
imported only for lines it has not translated before, and to settle a path matched by a file
with negations ("!pattern"); a file of plain patterns decides with one regex search.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from fetchml.cas.hashing import hash_bytes
from fetchml.errors import BadRequest

if TYPE_CHECKING:
    from pathspec import GitIgnoreSpec

logger = logging.getLogger(__name__)

CACHE_FILE = "ignorecache"
CACHE_VERSION = 1
# Translations kept at most; a project has a handful of ignore files.
MAX_CACHED = 256
_DIR_MARK_GROUP = "(?P<ps_d>"  # pathspec's named group for "matched as a directory"

# (regex source, include) of each pattern of one file, comments and blanks left out.
Translation = tuple[tuple[str, bool], ...]


def _translate(lines: Sequence[str], source: str) -> tuple[Translation, GitIgnoreSpec]:
    from pathspec import GitIgnoreSpec  # the slow import, only for lines not seen before

    try:
        spec = GitIgnoreSpec.from_lines(lines)
    except (ValueError, TypeError, re.error) as exc:
        raise BadRequest(f"{source} holds an invalid pattern ({exc}); fix that line") from exc
    translation = []
    for pattern in spec.patterns:
        regex = getattr(pattern, "regex", None)
        if isinstance(regex, re.Pattern) and pattern.include is not None:
            translation.append((str(regex.pattern), bool(pattern.include)))
    return tuple(translation), spec


class CompiledSpec:
    """One ignore file: a fast "does any pattern match" regex, pathspec for the hard cases."""

    __slots__ = ("_any", "_lines", "_negates", "_spec")

    def __init__(self, lines: Sequence[str], translation: Translation,
                 spec: GitIgnoreSpec | None = None) -> None:
        self._lines = tuple(lines)
        self._spec = spec
        self._negates = any(not include for _, include in translation)
        sources = [source.replace(_DIR_MARK_GROUP, "(?:") for source, _ in translation]
        try:
            self._any: re.Pattern[str] | None = re.compile(
                "|".join(f"(?:{source})" for source in sources) if sources else r"(?!)"
            )
        except re.error:
            self._any = None

    @property
    def any_pattern(self) -> re.Pattern[str] | None:
        """One regex matching wherever any pattern matches (None if it could not be built)."""
        return self._any

    def decision(self, path: str) -> bool | None:
        """True ignored, False re-included by a negation, None when no pattern matches."""
        if self._any is not None:
            if self._any.search(path) is None:
                return None
            if not self._negates:
                return True  # without negations, any match means ignored
        return self._full_spec().check_file(path).include

    def _full_spec(self) -> GitIgnoreSpec:
        if self._spec is None:
            from pathspec import GitIgnoreSpec

            self._spec = GitIgnoreSpec.from_lines(self._lines)
        return self._spec


def _pathspec_stamp() -> list[Any]:
    """Which pathspec release is installed, without importing it (translations depend on it)."""
    found = importlib.util.find_spec("pathspec")
    origin = found.origin if found is not None else None
    if origin is None:
        return []
    try:
        info = os.stat(origin)
    except OSError:
        return [origin]
    return [origin, info.st_size, info.st_mtime_ns]


class SpecCompiler:
    """Compiles ignore files through the translation cache at ``cache_path`` (if any)."""

    def __init__(self, cache_path: Path | None) -> None:
        self.cache_path = cache_path
        self._stamp = _pathspec_stamp()
        self._known: dict[str, Translation] = self._load()
        self._dirty = False

    def compile(self, lines: Sequence[str], source: str) -> CompiledSpec:
        key = hash_bytes("\n".join(lines).encode("utf-8", "surrogateescape"))
        translation = self._known.get(key)
        if translation is not None:
            return CompiledSpec(lines, translation)
        translation, spec = _translate(lines, source)
        if len(self._known) < MAX_CACHED:
            self._known[key] = translation
            self._dirty = True
        return CompiledSpec(lines, translation, spec)

    def _load(self) -> dict[str, Translation]:
        if self.cache_path is None:
            return {}
        try:
            data = self.cache_path.read_bytes()
        except OSError:
            return {}
        try:
            version, stamp, digest, payload = msgpack.unpackb(data, raw=False, use_list=False)
            if version != CACHE_VERSION or list(stamp) != self._stamp:
                return {}  # another format or pathspec release: translate afresh
            if hash_bytes(payload) != digest:
                raise ValueError("checksum mismatch")
            known = msgpack.unpackb(payload, raw=False, use_list=False)
            return {
                str(key): tuple((str(source), bool(include)) for source, include in rows)
                for key, rows in known.items()
            }
        except (ValueError, TypeError, AttributeError, msgpack.UnpackException) as exc:
            logger.debug("ignoring the damaged ignore cache %s: %s", self.cache_path, exc)
            return {}

    def save(self) -> None:
        """Keep new translations for the next run; a failure only costs a translation then."""
        if not self._dirty or self.cache_path is None:
            return
        payload = msgpack.packb(self._known, use_bin_type=True)
        data = msgpack.packb([CACHE_VERSION, self._stamp, hash_bytes(payload), payload],
                             use_bin_type=True)
        temp = self.cache_path.with_name(f"{CACHE_FILE}.tmp-{secrets.token_hex(6)}")
        try:
            self.cache_path.parent.mkdir(mode=0o700, exist_ok=True)
            temp.write_bytes(data)  # a derived cache: a checksum, not an fsync, guards it
            os.replace(temp, self.cache_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            logger.debug("could not save the ignore cache %s: %s", self.cache_path, exc)
            return
        self._dirty = False
