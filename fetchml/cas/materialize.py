"""Writing a snapshot out as a real directory tree, safely, from manifests nobody vouches for.

Every entry is re-validated here (a manifest object may have been built without its
constructor's checks), every directory is entered through a directory fd opened with
``O_NOFOLLOW``, and every file is created with ``O_EXCL|O_NOFOLLOW``, so nothing is written
through a symlink or outside the target. Files are copies: a job can never change a stored
object through its workspace.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from pathlib import Path

from fetchml.cas._fs import translate_os_error
from fetchml.cas.manifest import ManifestEntry, SnapshotManifest, entry_problem, refuse_entry
from fetchml.cas.objects import ObjectStore
from fetchml.errors import Conflict, IntegrityError

logger = logging.getLogger(__name__)

EXECUTABLE_MODE = 0o755
FILE_MODE = 0o644
DIR_MODE = 0o755
# Directory fds kept open along the current path; deeper trees reopen from the root.
MAX_OPEN_DIRS = 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _prepare_target(target: Path) -> bool:
    """Create ``target`` or check it is an empty real directory; True if it was created."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(target, DIR_MODE)
        return True
    except FileExistsError:
        pass
    except OSError as exc:
        raise translate_os_error(exc, f"creating {target}") from exc
    if target.is_symlink() or not target.is_dir() or any(target.iterdir()):
        raise Conflict(f"{target} already exists and is not an empty directory; choose a new path")
    return False


class _TreeWriter:
    """Creates entries under one root directory fd, keeping the current directory chain open."""

    def __init__(self, root_fd: int, store: ObjectStore) -> None:
        self._root_fd = root_fd
        self._store = store
        self._chain: list[tuple[str, int]] = []  # (name, fd) from the root down

    def close(self) -> None:
        for _, fd in reversed(self._chain):
            if fd >= 0:
                os.close(fd)
        self._chain.clear()

    def write(self, entry: ManifestEntry) -> None:
        problem = entry_problem(entry, check_link=True)
        if problem is not None:
            raise refuse_entry(entry.path if isinstance(entry.path, str) else "?", problem)
        *parents, name = entry.path.split("/")
        dir_fd = self._enter(entry.path, parents)
        try:
            if entry.kind == "file":
                assert entry.oid is not None
                if self._store.size(entry.oid) != entry.size:
                    raise IntegrityError(
                        f"object {entry.oid} does not have the {entry.size} bytes the snapshot "
                        f"lists for {entry.path!r}; run fetchml fsck",
                        details={"oid": entry.oid, "path": entry.path},
                    )
                mode = EXECUTABLE_MODE if entry.executable else FILE_MODE
                self._store.copy_to(entry.oid, dir_fd, name, mode)
            elif entry.kind == "link":
                assert entry.target is not None
                os.symlink(entry.target, name, dir_fd=dir_fd)
            else:
                os.mkdir(name, DIR_MODE, dir_fd=dir_fd)
        except (FileExistsError, Conflict) as exc:
            raise refuse_entry(entry.path, "appears twice or collides with another entry") from exc

    def _enter(self, path: str, parents: list[str]) -> int:
        """The fd of the directory ``parents`` (created as needed), never following a link."""
        keep = 0
        while (
            keep < len(self._chain)
            and keep < len(parents)
            and self._chain[keep][0] == parents[keep]
        ):
            keep += 1
        if keep and self._chain[keep - 1][1] < 0:
            keep = 0  # that ancestor's fd was closed to bound open fds: start from the root
        for _, fd in reversed(self._chain[keep:]):
            if fd >= 0:
                os.close(fd)
        del self._chain[keep:]
        dir_fd = self._chain[-1][1] if self._chain else self._root_fd
        for depth in range(keep, len(parents)):
            name = parents[depth]
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, DIR_MODE, dir_fd=dir_fd)
            try:
                dir_fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                parent = "/".join(parents[: depth + 1])
                raise refuse_entry(
                    path, f"is under {parent!r}, which is not a directory in this snapshot"
                ) from exc
            self._chain.append((name, dir_fd))
            shallowest = len(self._chain) - MAX_OPEN_DIRS - 1
            if shallowest >= 0:
                os.close(self._chain[shallowest][1])
                self._chain[shallowest] = (self._chain[shallowest][0], -1)
        return dir_fd


def _remove_contents(target: Path, created: bool) -> None:
    """Undo a failed materialise: leave ``target`` as it was (absent, or empty)."""
    try:
        if created:
            shutil.rmtree(target)
            return
        for child in target.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    except OSError as exc:
        logger.warning("could not clean up %s after a failed materialise: %s", target, exc)


def materialize(manifest: SnapshotManifest, store: ObjectStore, target: Path) -> None:
    """Write the tree ``manifest`` describes into ``target`` (absent or an empty directory).

    Files get mode 0755 or 0644, directories 0755; on any failure ``target`` is left as found.
    """
    target = Path(target)
    created = _prepare_target(target)
    try:
        root_fd = os.open(target, _DIR_FLAGS)
    except OSError as exc:
        raise translate_os_error(exc, f"opening {target}") from exc
    writer = _TreeWriter(root_fd, store)
    try:
        for entry in manifest.entries:
            writer.write(entry)
    except BaseException as exc:
        writer.close()
        _remove_contents(target, created)
        if isinstance(exc, OSError):
            raise translate_os_error(exc, f"materialising into {target}") from exc
        raise
    finally:
        writer.close()
        os.close(root_fd)
