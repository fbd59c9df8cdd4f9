"""blake3 digests of bytes and files: the names objects are stored under."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from blake3 import blake3

from fetchml.cas._fs import translate_os_error
from fetchml.errors import NotFound

OID_HEX_LEN = 64
_HEX_DIGITS = frozenset("0123456789abcdef")
_HEX_RUN = re.compile("[0-9a-f]*")

# Above this size a file is hashed with blake3's thread pool; below it, starting the
# threads costs more than they save.
MULTITHREAD_MIN_BYTES = 1 << 20
# Read size for streaming a file through the hasher: big enough for the thread pool to
# split, small enough to stay in cache between the read and the hash (1-2 MiB measured
# fastest; 8 MiB was ~1.5x slower).
READ_CHUNK_BYTES = 1 << 20


def is_oid(s: str) -> bool:
    """True if ``s`` is a well-formed object id: 64 lowercase hex digits."""
    return isinstance(s, str) and len(s) == OID_HEX_LEN and _HEX_DIGITS.issuperset(s)


def are_oids(items: Sequence[str]) -> bool:
    """True if every item is an object id: one regex over them all, for long lists."""
    try:
        return all(len(item) == OID_HEX_LEN for item in items) and (
            _HEX_RUN.fullmatch("".join(items)) is not None
        )
    except TypeError:  # something that is not a string
        return False


def hash_bytes(data: bytes) -> str:
    """The object id of ``data``."""
    if len(data) >= MULTITHREAD_MIN_BYTES:
        return blake3(data, max_threads=blake3.AUTO).hexdigest()
    return blake3(data).hexdigest()


class Hasher:
    """Incremental blake3 that also counts the bytes it has seen."""

    __slots__ = ("_hasher", "size")

    def __init__(self, *, multithreaded: bool = False) -> None:
        self._hasher = blake3(max_threads=blake3.AUTO) if multithreaded else blake3()
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hasher.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


def hash_fd(fd: int, size_hint: int | None = None) -> tuple[str, int]:
    """Hash an open file from its current offset to its end; returns (oid, bytes read).

    Streams through one reusable buffer, so memory stays bounded for any file size. OSError
    propagates: the caller knows what the file is and translates it.
    """
    if size_hint is None:
        size_hint = os.fstat(fd).st_size
    if size_hint < MULTITHREAD_MIN_BYTES:
        # Small files: a single read (plus one to see EOF) is the cheapest path.
        hasher = Hasher()
        while chunk := os.read(fd, max(size_hint + 1, 64 << 10)):
            hasher.update(chunk)
        return hasher.hexdigest(), hasher.size
    hasher = Hasher(multithreaded=True)
    buffer = bytearray(READ_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(fd, "rb", buffering=0, closefd=False) as stream:
        while count := stream.readinto(buffer):
            hasher.update(view[:count])
    return hasher.hexdigest(), hasher.size


def hash_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """The (oid, size) of a file, read in bounded memory."""
    shown = os.fsdecode(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFound(f"file {shown!r} does not exist; check the path") from exc
    except OSError as exc:
        raise translate_os_error(exc, f"opening {shown!r}") from exc
    try:
        return hash_fd(fd)
    except OSError as exc:
        raise translate_os_error(exc, f"reading {shown!r}") from exc
    finally:
        os.close(fd)
