"""The object store: immutable blobs on local disk, each named by the blake3 digest of its bytes.

Layout: ``root/ab/cdef…`` (the first two hex digits name a fan-out directory). Writers stage
bytes in ``.tmp-<random>`` files (uploads beside their final name; ingested local files, whose
digest is not known in advance, in the root), hash them, make them durable, then rename them
into place, so a valid name never points at bad bytes, even after a crash. Readers verify
digests and raise IntegrityError instead of returning corrupt bytes.

Thread-safe: every method may be called from several threads at once (a PendingObject is used
by one writer at a time).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from fetchml.cas._fs import (
    fsync_directory,
    kernel_copy,
    sync_filesystem,
    translate_os_error,
    write_all,
)
from fetchml.cas._layout import (
    FANOUT_LEN,
    TEMP_PREFIX,
    StoreFile,
    check_oid,
    check_oids,
    iter_store_files,
)
from fetchml.cas.hashing import MULTITHREAD_MIN_BYTES, Hasher, hash_bytes, hash_fd, is_oid
from fetchml.cas.pending import PendingObject
from fetchml.cas.presence import PresenceChecker
from fetchml.errors import BadRequest, Conflict, FetchmlError, IntegrityError, NotFound

__all__ = [
    "FANOUT_LEN",
    "TEMP_PREFIX",
    "ObjectStore",
    "PendingObject",
    "StoreFile",
    "iter_store_files",
]

STORED_MODE = 0o444
DEFAULT_CHUNK_BYTES = 4 << 20
# Objects up to this size are copied out with one read and one write, verified before the
# destination file exists; larger ones go through copy_file_range (a reflink where possible).
SMALL_OBJECT_BYTES = 1 << 20
_CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
# flush(): with more touched directories than this, one syncfs beats an fsync per directory.
FLUSH_SYNCFS_MIN_DIRS = 8


class ObjectStore:
    """blake3-addressed, read-only blobs under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise translate_os_error(exc, f"creating the object store {self.root}") from exc
        self._lock = threading.Lock()
        self._touched_dirs: set[Path] = set()
        self._presence = PresenceChecker(os.fspath(self.root))

    def __repr__(self) -> str:
        return f"ObjectStore({str(self.root)!r})"

    # -- names ------------------------------------------------------------------------------

    def path(self, oid: str) -> Path:
        check_oid(oid)
        return self.root / oid[:FANOUT_LEN] / oid[FANOUT_LEN:]

    def contains(self, oid: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(self.path(oid)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def missing(self, oids: Iterable[str]) -> list[str]:
        """The oids not in the store, in the order given, each once.

        Repeated checks of mostly the same objects re-read only what may have changed
        (see ``presence``).
        """
        unique = list(dict.fromkeys(oids))
        check_oids(unique)
        return self._presence.missing(unique)

    def size(self, oid: str) -> int:
        try:
            return os.stat(self.path(oid)).st_size
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise self.not_found(oid) from exc

    # -- writing ----------------------------------------------------------------------------

    def begin(self, oid: str, size: int) -> PendingObject:
        """Start an upload of ``size`` bytes expected to hash to ``oid``."""
        check_oid(oid)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(f"object size {size!r} is invalid; sizes are non-negative integers")
        final = self.path(oid)
        temp = final.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            final.parent.mkdir(exist_ok=True)
            fd = os.open(temp, _CREATE_FLAGS | os.O_WRONLY, 0o600)
        except OSError as exc:
            raise translate_os_error(exc, f"starting the upload of object {oid}") from exc
        return PendingObject(oid, size, fd, temp)

    def commit(self, pendings: Sequence[PendingObject]) -> None:
        """Verify, make durable and publish uploads; call flush() before naming them anywhere.

        Good objects are committed even when others in the batch fail; the first failure is
        raised afterwards (``details["failed"]`` lists every failed oid).
        """
        failures: list[FetchmlError] = []
        good: list[PendingObject] = []
        for pending in pendings:
            problem = self._problem_with(pending)
            if problem is None:
                good.append(pending)
            else:
                failures.append(problem)
                pending.discard()
        try:
            for pending in good:
                pending.close_file()
                os.chmod(pending.temp_path, STORED_MODE)
            self._sync_data([pending.temp_path for pending in good])
            for pending in good:
                pending.mark_finished()
                self._install(pending.temp_path, self.path(pending.oid))
        except OSError as exc:
            for pending in good:
                pending.discard()
            raise translate_os_error(exc, "committing uploaded objects") from exc
        if failures:
            first = failures[0]
            first.details["failed"] = [str(failure.details["oid"]) for failure in failures]
            raise first

    @staticmethod
    def _problem_with(pending: PendingObject) -> FetchmlError | None:
        oid = pending.oid
        details = {"oid": oid}
        if pending.finished:
            return Conflict(
                f"the upload of object {oid} is already finished; begin it again",
                details=details,
            )
        if not pending.complete:
            return BadRequest(
                f"object {oid} received {pending.received} of {pending.size} bytes; "
                "send the rest before committing",
                details=details,
            )
        digest = pending.digest()
        if digest != oid:
            return IntegrityError(
                f"the bytes sent for object {oid} hash to {digest}; "
                "resend the file (it may have changed while uploading)",
                details=details,
            )
        return None

    def _sync_data(self, temps: Sequence[Path]) -> None:
        """Put the temp files' bytes on stable storage: no rename may come before this."""
        if len(temps) == 1:
            fd = os.open(temps[0], os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        elif temps:
            # One syncfs for the batch costs far less than an fdatasync per file.
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                sync_filesystem(fd)
            finally:
                os.close(fd)

    def _install(self, temp: Path, final: Path) -> None:
        """Rename a durable temp file to its name; an existing object is identical, so keep it."""
        if os.path.lexists(final):
            temp.unlink(missing_ok=True)
            return
        final.parent.mkdir(exist_ok=True)
        os.rename(temp, final)
        with self._lock:
            self._touched_dirs.add(final.parent)

    def flush(self) -> None:
        """Make every name committed so far durable; write a manifest only after this."""
        with self._lock:
            dirs, self._touched_dirs = self._touched_dirs, set()
        if not dirs:
            return
        try:
            if len(dirs) >= FLUSH_SYNCFS_MIN_DIRS:
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    sync_filesystem(fd)
                finally:
                    os.close(fd)
            else:
                for directory in dirs:
                    fsync_directory(directory)
        except OSError as exc:
            with self._lock:
                self._touched_dirs |= dirs
            raise translate_os_error(exc, "flushing the object store") from exc

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` durably; returns its oid."""
        oid = hash_bytes(data)
        if not self.contains(oid):
            with self.begin(oid, len(data)) as pending:
                pending.write(data)
                self.commit([pending])
        self.flush()
        return oid

    def put_file(self, path: str | os.PathLike[str]) -> tuple[str, int]:
        """Ingest one local regular file durably in bounded memory; returns (oid, size)."""
        return self.put_files([path])[0]

    def put_files(self, paths: Iterable[str | os.PathLike[str]]) -> list[tuple[str, int]]:
        """Ingest local regular files durably, with one sync for the batch; (oid, size) each.

        Each file is copied with copy_file_range (a clone on filesystems that can) and the
        copy is what gets hashed, so a name always matches the stored bytes even if a source
        changes meanwhile.
        """
        staged: list[tuple[Path, str, int]] = []
        try:
            for path in paths:
                staged.append(self._stage_file(path))
            self._sync_data([temp for temp, _, _ in staged])
            for temp, oid, _ in staged:
                self._install(temp, self.path(oid))
        except OSError as exc:
            raise translate_os_error(exc, "storing files") from exc
        finally:
            for temp, _, _ in staged:
                temp.unlink(missing_ok=True)
        self.flush()
        return [(oid, size) for _, oid, size in staged]

    def _stage_file(self, path: str | os.PathLike[str]) -> tuple[Path, str, int]:
        shown = os.fsdecode(path)
        try:
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError as exc:
            raise NotFound(f"file {shown!r} does not exist; check the path") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BadRequest(f"{shown!r} is a symlink; store regular files only") from exc
            raise translate_os_error(exc, f"opening {shown!r}") from exc
        temp = self.root / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        try:
            if not stat.S_ISREG(os.fstat(src).st_mode):
                raise BadRequest(f"{shown!r} is not a regular file; store regular files only")
            dst = os.open(temp, _CREATE_FLAGS | os.O_RDWR, 0o600)
            try:
                oid, size = self._copy_hashing(src, dst)
                os.fchmod(dst, STORED_MODE)
            finally:
                os.close(dst)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        finally:
            os.close(src)
        return temp, oid, size

    @staticmethod
    def _copy_hashing(src: int, dst: int) -> tuple[str, int]:
        """Copy src into dst (opened read-write); returns the (oid, size) of what dst holds."""
        copied = kernel_copy(src, dst)
        if copied is not None:
            os.lseek(dst, 0, os.SEEK_SET)
            return hash_fd(dst, copied)
        hasher = Hasher(multithreaded=os.fstat(src).st_size >= MULTITHREAD_MIN_BYTES)
        while chunk := os.read(src, DEFAULT_CHUNK_BYTES):
            write_all(dst, chunk)
            hasher.update(chunk)
        return hasher.hexdigest(), hasher.size

    # -- reading ----------------------------------------------------------------------------

    @staticmethod
    def not_found(oid: str) -> NotFound:
        return NotFound(f"object {oid} is not in the store; upload it again", details={"oid": oid})

    @staticmethod
    def _corrupt(oid: str) -> IntegrityError:
        return IntegrityError(
            f"stored object {oid} is corrupt (its bytes no longer match its digest); "
            "run fetchml fsck and upload it again",
            details={"oid": oid},
        )

    def _open(self, oid: str) -> int:
        try:
            return os.open(self.path(oid), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise self.not_found(oid) from exc
        except OSError as exc:
            raise translate_os_error(exc, f"opening object {oid}") from exc

    def read_bytes(self, oid: str) -> bytes:
        fd = self._open(oid)
        try:
            with open(fd, "rb", closefd=False) as stream:
                data = stream.read()
        except OSError as exc:
            raise translate_os_error(exc, f"reading object {oid}") from exc
        finally:
            os.close(fd)
        if hash_bytes(data) != oid:
            raise self._corrupt(oid)
        return data

    def iter_chunks(self, oid: str, chunk_size: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        """Stream an object; the last chunk comes only once the whole object is verified."""
        if chunk_size <= 0:
            raise BadRequest(f"chunk size {chunk_size} is invalid; use a positive size")
        self.size(oid)  # NotFound now rather than at the first next()
        return self._verified_chunks(oid, chunk_size)

    def _verified_chunks(self, oid: str, chunk_size: int) -> Iterator[bytes]:
        # Opened inside the generator so an iterator that is never started holds no fd.
        fd = self._open(oid)
        try:
            hasher = Hasher(multithreaded=os.fstat(fd).st_size >= MULTITHREAD_MIN_BYTES)
            held: bytes | None = None
            while chunk := os.read(fd, chunk_size):
                hasher.update(chunk)
                if held is not None:
                    yield held
                held = chunk
            if hasher.hexdigest() != oid:
                raise self._corrupt(oid)
            if held is not None:
                yield held
        except OSError as exc:
            raise translate_os_error(exc, f"reading object {oid}") from exc
        finally:
            os.close(fd)

    def copy_to(self, oid: str, dir_fd: int, name: str, mode: int) -> None:
        """Write the object as a new file ``name`` in ``dir_fd`` (never through a symlink).

        The copy is verified; on a mismatch the new file is removed and IntegrityError raised.
        """
        if not name or "/" in name or name in (".", ".."):
            raise BadRequest(f"{name!r} is not a file name; copy_to creates one entry of dir_fd")
        src = self._open(oid)
        try:
            data: bytes | None = None
            if os.fstat(src).st_size <= SMALL_OBJECT_BYTES:
                # Small: verify before the destination exists, then one write.
                with open(src, "rb", closefd=False) as stream:
                    data = stream.read()
                if hash_bytes(data) != oid:
                    raise self._corrupt(oid)
            dst = self._create(dir_fd, name)
            try:
                if data is not None:
                    write_all(dst, data)
                elif self._copy_hashing(src, dst)[0] != oid:
                    raise self._corrupt(oid)
                os.fchmod(dst, mode & 0o777)
            except BaseException:
                os.close(dst)
                os.unlink(name, dir_fd=dir_fd)
                raise
            os.close(dst)
        except FileExistsError as exc:
            raise Conflict(
                f"{name!r} already exists in the target directory; materialise into an empty one"
            ) from exc
        except OSError as exc:
            raise translate_os_error(exc, f"copying object {oid} to {name!r}") from exc
        finally:
            os.close(src)

    @staticmethod
    def _create(dir_fd: int, name: str) -> int:
        return os.open(name, _CREATE_FLAGS | os.O_RDWR, 0o600, dir_fd=dir_fd)

    # -- maintenance ------------------------------------------------------------------------

    def verify(self, oid: str) -> bool:
        """True when the object is present and its bytes hash to its name."""
        try:
            fd = self._open(oid)
        except NotFound:
            return False
        try:
            return hash_fd(fd)[0] == oid
        except OSError as exc:
            raise translate_os_error(exc, f"reading object {oid}") from exc
        finally:
            os.close(fd)

    def iter_oids(self) -> Iterator[str]:
        for item in iter_store_files(self.root):
            if item.oid is not None:
                yield item.oid

    def delete(self, oid: str) -> None:
        """Remove an object; removing one that is already gone is not an error."""
        try:
            self.path(oid).unlink(missing_ok=True)
        except OSError as exc:
            raise translate_os_error(exc, f"deleting object {oid}") from exc

    def remove_temp_files(self, older_than_s: float = 0) -> int:
        """Delete leftover temp files (from crashed uploads) older than ``older_than_s``."""
        cutoff = time.time() - older_than_s
        removed = 0
        for item in iter_store_files(self.root):
            if item.kind != "temp":
                continue
            try:
                if older_than_s <= 0 or item.path.lstat().st_mtime < cutoff:
                    item.path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def find_prefix(self, prefix: str, limit: int = 2) -> list[str]:
        """Stored ids starting with ``prefix`` (at least the fan-out digits); ``limit`` at most."""
        fanout, rest = prefix[:FANOUT_LEN], prefix[FANOUT_LEN:]
        if len(fanout) < FANOUT_LEN:
            raise BadRequest(f"give at least {FANOUT_LEN} hex digits of an id")
        try:
            names = sorted(os.listdir(self.root / fanout))
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = [fanout + n for n in names if n.startswith(rest) and is_oid(fanout + n)]
        return found[:limit]

    def stats(self) -> tuple[int, int]:
        """(number of objects, total bytes)."""
        count = total = 0
        for item in iter_store_files(self.root):
            if item.kind == "object":
                try:
                    total += item.path.lstat().st_size
                except FileNotFoundError:
                    continue
                count += 1
        return count, total
