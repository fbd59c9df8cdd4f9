"""Which files of a project stay out of its snapshots: gitignore rules plus fetchml's defaults.

Precedence, lowest first (a later level that matches a path decides it, so a negation can
re-include what an earlier level ignores): built-in defaults, the root ``.gitignore``, nested
``.gitignore`` files (scoped to their directory, deeper wins), the root ``.fetchmlignore``
(so it can re-include what git ignores), then extra patterns from the configuration.
A directory holding a ``pyvenv.cfg`` (a virtualenv, whatever its name) is ignored too.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path

from pathspec import GitIgnoreSpec

from fetchml.errors import BadRequest

logger = logging.getLogger(__name__)

IGNORE_FILE = ".fetchmlignore"
GITIGNORE_FILE = ".gitignore"
VENV_MARKER = "pyvenv.cfg"

DEFAULT_PATTERNS: tuple[str, ...] = (
    ".git/",
    ".fetchml/",
    "__pycache__/",
    "*.pyc",
    ".mypy_cache/",
    ".pytest_cache/",
    # Editor junk: vim swap files, backups, vim's write-test file "4913", emacs lock files.
    "*.swp",
    "*.swx",
    "*~",
    "4913",
    ".#*",
)

TEMPLATE = """\
# .fetchmlignore: files fetchml leaves out of snapshots (gitignore syntax).
#
# Applied after .gitignore, so "!pattern" here re-includes something git ignores.
# Already ignored by default: .git/ .fetchml/ __pycache__/ *.pyc .mypy_cache/
# .pytest_cache/ editor swap files, and any virtualenv (a directory with a pyvenv.cfg).
#
# Keep big data and results out of snapshots; jobs read them from the box instead:
# data/
# checkpoints/
# wandb/
# *.ckpt
#
# Re-include something .gitignore hides:
# !configs/local.yaml
"""


class _Spec:
    """A compiled gitignore file with a fast path for the common "no pattern matches" case.

    pathspec tries each pattern's regex in turn; one combined regex answers "does any
    pattern match" in a single search, so unmatched paths cost one regex call.
    """

    __slots__ = ("_any", "_spec")

    def __init__(self, spec: GitIgnoreSpec) -> None:
        self._spec = spec
        regexes = [getattr(pattern, "regex", None) for pattern in spec.patterns]
        sources = [
            regex.pattern.replace("(?P<ps_d>", "(?:")
            for regex in regexes
            if isinstance(regex, re.Pattern)
        ]
        try:
            self._any: re.Pattern[str] | None = re.compile("|".join(f"(?:{s})" for s in sources))
        except re.error:
            self._any = None
        if not sources:
            self._any = re.compile(r"(?!)")  # matches nothing

    def decision(self, path: str) -> bool | None:
        """True ignored, False re-included by a negation, None when no pattern matches."""
        if self._any is not None and self._any.search(path) is None:
            return None
        return self._spec.check_file(path).include


def _load_spec(path: Path) -> _Spec | None:
    """Parse one ignore file; None if it does not exist."""
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        raise BadRequest(f"cannot read {path} ({exc.strerror}); fix its permissions") from exc
    return _compile(text.splitlines(), str(path))


def _compile(lines: Sequence[str], source: str) -> _Spec:
    try:
        return _Spec(GitIgnoreSpec.from_lines(lines))
    except (ValueError, TypeError, re.error) as exc:
        raise BadRequest(f"{source} holds an invalid pattern ({exc}); fix that line") from exc


def _decision(spec: _Spec | None, path: str) -> bool | None:
    return None if spec is None else spec.decision(path)


class IgnoreRules:
    """Decides, per relative path, whether a file or directory is left out of a snapshot.

    Cheap per call: nested ``.gitignore`` files and the verdicts on directories are loaded
    once and cached, so the file watcher can ask about every event. Thread-safe.
    """

    def __init__(
        self,
        root: Path,
        *,
        defaults: _Spec,
        root_gitignore: _Spec | None,
        fetchmlignore: _Spec | None,
        extra: _Spec | None,
    ) -> None:
        self.root = Path(root)
        self._defaults = defaults
        self._fetchmlignore = fetchmlignore
        self._extra = extra
        self._lock = threading.Lock()
        # Directory (relative, "" for the root) -> its .gitignore, parsed on first use.
        self._gitignores: dict[str, _Spec | None] = {"": root_gitignore}
        # Directory -> whether it (or one of its ancestors) is ignored.
        self._ignored_dirs: dict[str, bool] = {"": False}

    @classmethod
    def load(cls, root: Path, extra_patterns: Sequence[str] = ()) -> IgnoreRules:
        root = Path(root)
        return cls(
            root,
            defaults=_compile(DEFAULT_PATTERNS, "the default ignore patterns"),
            root_gitignore=_load_spec(root / GITIGNORE_FILE),
            fetchmlignore=_load_spec(root / IGNORE_FILE),
            extra=_compile(extra_patterns, "the ignore setting") if extra_patterns else None,
        )

    def is_ignored(self, rel_path: str, is_dir: bool) -> bool:
        """Whether ``rel_path`` (relative, '/'-separated) is left out, ancestors included."""
        rel_path = rel_path.strip("/")
        if not rel_path:
            return False
        parent, _, _ = rel_path.rpartition("/")
        if self._dir_ignored(parent):
            return True
        if is_dir:
            return self._dir_ignored(rel_path)
        return self._matches(rel_path, is_dir=False)

    def _dir_ignored(self, rel_dir: str) -> bool:
        cached = self._ignored_dirs.get(rel_dir)
        if cached is not None:
            return cached
        parent, _, _ = rel_dir.rpartition("/")
        ignored = (
            self._dir_ignored(parent)
            or self._matches(rel_dir, is_dir=True)
            or (self.root / rel_dir / VENV_MARKER).exists()
        )
        with self._lock:
            self._ignored_dirs[rel_dir] = ignored
        return ignored

    def _matches(self, rel_path: str, *, is_dir: bool) -> bool:
        """The pattern verdict for a path whose parent directory is not ignored."""
        candidate = rel_path + "/" if is_dir else rel_path
        for spec in (self._extra, self._fetchmlignore):
            verdict = _decision(spec, candidate)
            if verdict is not None:
                return verdict
        # .gitignore files from the deepest enclosing directory up to the root.
        parent = rel_path
        while parent:
            parent, _, _ = parent.rpartition("/")
            spec = self._gitignore(parent)
            verdict = _decision(spec, candidate[len(parent) + 1 :] if parent else candidate)
            if verdict is not None:
                return verdict
        return _decision(self._defaults, candidate) is True

    def _gitignore(self, rel_dir: str) -> _Spec | None:
        if rel_dir in self._gitignores:
            return self._gitignores[rel_dir]
        spec = _load_spec(self.root / rel_dir / GITIGNORE_FILE)
        with self._lock:
            self._gitignores[rel_dir] = spec
        return spec
