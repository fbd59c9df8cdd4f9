"""Which files of a project stay out of its snapshots: gitignore rules plus fetchml's defaults.

Precedence, lowest first (a later level that matches a path decides it, so a negation can
re-include what an earlier level ignores): built-in defaults, the root ``.gitignore``, nested
``.gitignore`` files (scoped to their directory, deeper wins), the root ``.fetchmlignore``
(so it can re-include what git ignores), then extra patterns from the configuration.
A directory holding a ``pyvenv.cfg`` (a virtualenv, whatever its name) is ignored too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from fetchml.cas.ignore_spec import CACHE_FILE, CompiledSpec, SpecCompiler
from fetchml.errors import BadRequest

logger = logging.getLogger(__name__)

IGNORE_FILE = ".fetchmlignore"
PROJECT_DIR = ".fetchml"  # per-project state (caches), ignored by default
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


class _Chain:
    """The ignore files that apply in one directory, highest precedence first.

    Each link is (spec, how many leading characters of a root-relative path to cut so the
    path is relative to the spec's directory). The first spec with a verdict decides.
    """

    __slots__ = ("_any", "_links")

    def __init__(self, links: tuple[tuple[CompiledSpec, int], ...]) -> None:
        self._links = links
        # When every spec reads root-relative paths, one combined regex answers the common
        # "nothing matches" case in a single search.
        self._any: re.Pattern[str] | None = None
        if all(cut == 0 and spec.any_pattern is not None for spec, cut in links):
            sources = [spec.any_pattern.pattern for spec, _ in links if spec.any_pattern]
            with contextlib.suppress(re.error):
                self._any = re.compile("|".join(f"(?:{source})" for source in sources))

    def verdict(self, candidate: str) -> bool:
        """True when ``candidate`` (root-relative, '/'-terminated for a directory) is ignored."""
        if self._any is not None and self._any.search(candidate) is None:
            return False
        for spec, cut in self._links:
            decided = spec.decision(candidate[cut:] if cut else candidate)
            if decided is not None:
                return decided
        return False


def _load(compiler: SpecCompiler, path: Path) -> CompiledSpec | None:
    """One ignore file, compiled; None if it does not exist."""
    lines = _read_lines(path)
    return None if lines is None else compiler.compile(lines, str(path))


def _read_lines(path: Path) -> list[str] | None:
    """The lines of one ignore file; None if it does not exist."""
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except OSError as exc:
        raise BadRequest(f"cannot read {path} ({exc.strerror}); fix its permissions") from exc
    return text.splitlines()


class IgnoreRules:
    """Decides, per relative path, whether a file or directory is left out of a snapshot.

    Cheap per call: nested ``.gitignore`` files and the verdicts on directories are loaded
    once and cached, so the file watcher can ask about every event. Thread-safe.
    """

    def __init__(
        self,
        root: Path,
        *,
        compiler: SpecCompiler,
        defaults: CompiledSpec,
        root_gitignore: CompiledSpec | None,
        fetchmlignore: CompiledSpec | None,
        extra: CompiledSpec | None,
    ) -> None:
        self.root = Path(root)
        self._compiler = compiler
        self._defaults = defaults
        self._fetchmlignore = fetchmlignore
        self._extra = extra
        self._lock = threading.Lock()
        # Directory (relative, "" for the root) -> its .gitignore, parsed on first use.
        self._gitignores: dict[str, CompiledSpec | None] = {"": root_gitignore}
        # Directory -> whether it (or one of its ancestors) is ignored.
        self._ignored_dirs: dict[str, bool] = {"": False}
        # Directory -> the specs that decide about its entries.
        self._chains: dict[str, _Chain] = {}

    @classmethod
    def load(cls, root: Path, extra_patterns: Sequence[str] = ()) -> IgnoreRules:
        root = Path(root)
        compiler = SpecCompiler(root / PROJECT_DIR / CACHE_FILE)
        return cls(
            root,
            compiler=compiler,
            defaults=compiler.compile(DEFAULT_PATTERNS, "the default ignore patterns"),
            root_gitignore=_load(compiler, root / GITIGNORE_FILE),
            fetchmlignore=_load(compiler, root / IGNORE_FILE),
            extra=compiler.compile(extra_patterns, "the ignore setting") if extra_patterns
            else None,
        )

    def save_cache(self) -> None:
        """Keep the translations of ignore files for the next scan (see ``ignore_spec``)."""
        self._compiler.save()

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
            # os.path.exists, not Path.exists: an unreadable directory is not a virtualenv
            # here, and the scan reports it by name when it tries to list it.
            or os.path.exists(self.root / rel_dir / VENV_MARKER)
        )
        with self._lock:
            self._ignored_dirs[rel_dir] = ignored
        return ignored

    def file_matcher(self, rel_dir: str) -> Callable[[str], bool]:
        """``is_ignored(path, is_dir=False)`` for files of ``rel_dir``, a directory known to be
        kept (a scan enters only those): one lookup per directory, not one per file."""
        chain = self._chain(rel_dir)
        return lambda rel_path: chain.verdict(rel_path)

    def _matches(self, rel_path: str, *, is_dir: bool) -> bool:
        """The pattern verdict for a path whose parent directory is not ignored."""
        parent, _, _ = rel_path.rpartition("/")
        return self._chain(parent).verdict(rel_path + "/" if is_dir else rel_path)

    def _chain(self, rel_dir: str) -> _Chain:
        """The specs deciding about entries of ``rel_dir``, in precedence order."""
        chain = self._chains.get(rel_dir)
        if chain is not None:
            return chain
        links: list[tuple[CompiledSpec, int]] = [
            (spec, 0) for spec in (self._extra, self._fetchmlignore) if spec is not None
        ]
        # .gitignore files from the deepest enclosing directory up to the root; their
        # patterns are relative to their own directory, so the path is cut to match.
        parent = rel_dir
        while True:
            spec = self._gitignore(parent)
            if spec is not None:
                links.append((spec, len(parent) + 1 if parent else 0))
            if not parent:
                break
            parent, _, _ = parent.rpartition("/")
        links.append((self._defaults, 0))
        chain = _Chain(tuple(links))
        with self._lock:
            self._chains[rel_dir] = chain
        return chain

    def _gitignore(self, rel_dir: str) -> CompiledSpec | None:
        if rel_dir in self._gitignores:
            return self._gitignores[rel_dir]
        spec = _load(self._compiler, self.root / rel_dir / GITIGNORE_FILE)
        with self._lock:
            self._gitignores[rel_dir] = spec
        return spec
