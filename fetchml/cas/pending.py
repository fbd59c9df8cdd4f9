"""An upload in progress: a temp file beside the object's final name, hashed as it is written."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from fetchml.cas._fs import translate_os_error, write_all
from fetchml.cas.hashing import MULTITHREAD_MIN_BYTES, Hasher
from fetchml.errors import BadRequest, Conflict


class PendingObject:
    """Created by ``ObjectStore.begin``; finished by ``ObjectStore.commit`` or ``discard()``.

    The temp file is closed as soon as the declared size has arrived, so a large batch of
    finished uploads waiting for one commit holds no file descriptors.
    """

    def __init__(self, oid: str, size: int, fd: int, temp_path: Path) -> None:
        self.oid = oid
        self.size = size
        self.temp_path = temp_path
        self._fd: int | None = fd
        self._hasher = Hasher(multithreaded=size >= MULTITHREAD_MIN_BYTES)
        self._finished = False

    def __repr__(self) -> str:
        return f"PendingObject({self.oid[:12]}, {self.received}/{self.size})"

    @property
    def received(self) -> int:
        return self._hasher.size

    @property
    def complete(self) -> bool:
        return self._hasher.size == self.size

    @property
    def finished(self) -> bool:
        """True once committed or discarded."""
        return self._finished

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._finished or self._fd is None:
            raise Conflict(f"the upload of object {self.oid} is already finished; begin it again")
        if self._hasher.size + len(data) > self.size:
            raise BadRequest(
                f"object {self.oid} was declared as {self.size} bytes but more were sent; "
                "send exactly the declared size"
            )
        try:
            write_all(self._fd, data)
        except OSError as exc:
            self.discard()
            raise translate_os_error(exc, f"writing object {self.oid}") from exc
        self._hasher.update(data)
        if self.complete:
            self.close_file()

    def digest(self) -> str:
        return self._hasher.hexdigest()

    def close_file(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def mark_finished(self) -> None:
        self.close_file()
        self._finished = True

    def discard(self) -> None:
        """Drop the upload and its temp file (does nothing once committed)."""
        if self._finished:
            return
        self.mark_finished()
        self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> PendingObject:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.discard()
