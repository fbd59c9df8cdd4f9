"""Low-level file helpers shared by the store modules: durable syncs, kernel copies, errors."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

from fetchml.errors import FetchmlError, InternalError, Unavailable

logger = logging.getLogger(__name__)

# copy_file_range moves at most this much per call; bounded so a huge copy is interruptible.
COPY_CHUNK_BYTES = 64 << 20
# errnos meaning "this pair of files cannot be copied in the kernel": fall back to read/write.
_NO_KERNEL_COPY = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}
)

_syncfs: Callable[[int], int] | None = None
_syncfs_looked_up = False


def _lookup_syncfs() -> Callable[[int], int] | None:
    global _syncfs, _syncfs_looked_up
    if not _syncfs_looked_up:
        import ctypes  # only the daemon syncs: keeps the CLI's start-up light

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            function = libc.syncfs
            function.argtypes = [ctypes.c_int]
            function.restype = ctypes.c_int
            _syncfs = function
        except (OSError, AttributeError):
            _syncfs = None
        _syncfs_looked_up = True
    return _syncfs


def sync_filesystem(dir_fd: int) -> None:
    """Flush every dirty page and inode of the filesystem holding ``dir_fd`` to stable storage.

    One ``syncfs(2)`` costs far less than an ``fdatasync`` per file for a batch of small files.
    """
    function = _lookup_syncfs()
    if function is None:
        os.sync()
        return
    if function(dir_fd) != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Make the names in a directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written (a write may be short)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def kernel_copy(src_fd: int, dst_fd: int) -> int | None:
    """Copy src (from offset 0) to dst (at its current offset) with copy_file_range.

    Filesystems that support it clone the extents instead of copying bytes. Returns the
    number of bytes copied, or None when the kernel cannot copy this pair (nothing written).
    """
    offset = 0
    while True:
        try:
            copied = os.copy_file_range(src_fd, dst_fd, COPY_CHUNK_BYTES, offset)
        except OSError as exc:
            if offset == 0 and exc.errno in _NO_KERNEL_COPY:
                return None
            raise
        if copied == 0:
            return offset
        offset += copied


def translate_os_error(exc: OSError, doing: str) -> FetchmlError:
    """Turn an OSError into the fetchml error a user can act on; ``doing`` says what failed."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Unavailable(f"the disk is full while {doing}; free some space or run "
                           "`fetchml prune`")
    return InternalError(f"{doing} failed: {exc.strerror or exc}; check the disk and retry")
