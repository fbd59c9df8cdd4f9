"""The audit log: one JSON object per line, chained by HMAC so that edits are evident.

Each line carries ``prev`` (the previous line's ``hash``) and ``hash``: HMAC-SHA256 of its own
canonical content with ``prev``, under a key derived from the daemon secret (which jobs cannot
read). Changing, deleting or reordering any line is found by ``verify``, which names the first
line that does not hold together; rewriting a line and recomputing the chain needs the key.
Deleting the last lines leaves a chain that holds, so the head (count and last hash, MACed) is
also kept in ``<log>.head``: a log that ends before its head was cut. Rotation renames the file
to ``.1`` (older ones shift to ``.2`` ...); the chain continues across files. All text is
JSON-escaped (ASCII only), so nothing a user sends can break a line or add control characters.
API keys never reach this log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fetchml.errors import InternalError

log = logging.getLogger(__name__)

GENESIS = "0" * 64
VERSION = 2  # lines MACed under the audit key; version 1 lines were plain blake3
HEAD_SUFFIX = ".head"
MAX_TEXT = 200  # longest string kept in an audit detail
MAX_ITEMS = 50  # longest list kept in an audit detail


def _bounded(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if depth > 3:
        return str(value)[:MAX_TEXT]
    if isinstance(value, dict):
        items = list(value.items())[:MAX_ITEMS]
        return {str(k)[:MAX_TEXT]: _bounded(v, depth + 1) for k, v in items}
    if isinstance(value, (list, tuple, set)):
        return [_bounded(v, depth + 1) for v in list(value)[:MAX_ITEMS]]
    return str(value)[:MAX_TEXT]


def audit_key(secret: bytes) -> bytes:
    """The chain's key: derived from the daemon secret, so it is as private as the secret."""
    return hmac.new(secret, b"fetchml audit chain v2", hashlib.sha256).digest()


def _digest(key: bytes, entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=True).encode()
    return hmac.new(key, text, hashlib.sha256).hexdigest()


def _head_mac(key: bytes, seq: int, last: str) -> str:
    return hmac.new(key, f"head {seq} {last}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    lines: int
    files: list[str]
    bad_file: str | None = None
    bad_line: int | None = None  # 1-based line number within bad_file
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "lines": self.lines, "files": self.files,
                "bad_file": self.bad_file, "bad_line": self.bad_line, "reason": self.reason}


class AuditLog:
    def __init__(self, path: Path, key: bytes, *, max_bytes: int = 10 << 20,
                 keep: int = 20) -> None:
        self.path, self.key, self.max_bytes, self.keep = path, key, max_bytes, keep
        self.head_path = path.with_name(path.name + HEAD_SUFFIX)
        self._lock = threading.Lock()
        self._seq = 0
        self._prev = GENESIS

    def open(self) -> None:
        """Find where the chain ends, so new lines continue it."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._set_aside_unkeyed()
        for candidate in [self.path, *self._rotated()]:
            last = _last_line(candidate)
            if last is not None:
                try:
                    entry = json.loads(last)
                    self._seq, self._prev = int(entry["seq"]), str(entry["hash"])
                except (ValueError, KeyError, TypeError):
                    log.error("the last audit line of %s is damaged; `fetchml audit verify` "
                              "will report it", candidate)
                    self._seq, self._prev = 0, hashlib.sha256(last.encode()).hexdigest()
                break
        head = self._read_head()
        if head is not None and head[0] > self._seq:
            # Lines were cut from the end: continue after the head, so the gap stays visible.
            log.error("the audit log ends at entry %d but %d were written; `fetchml audit "
                      "verify` will report it", self._seq, head[0])
            self._seq, self._prev = head

    def _set_aside_unkeyed(self) -> None:
        """Logs of an older fetchml (unkeyed lines) are renamed ``*.unkeyed``; a new chain
        starts, so no unkeyed line can be passed off as part of the keyed one."""
        last = _last_line(self.path)
        if last is None or '"v": 2' in last:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for path in [self.path, *self._rotated()]:
            path.rename(path.with_name(f"{path.name}.{stamp}.unkeyed"))
        log.warning("the audit log was written by an older fetchml without a key; it was kept "
                    "as %s.%s.unkeyed and a keyed log starts now", self.path.name, stamp)

    def _read_head(self) -> tuple[int, str] | None:
        """The recorded head (count, last hash), or None when absent; a head whose MAC does
        not match is ignored here and reported by ``verify``."""
        try:
            head = json.loads(self.head_path.read_bytes())
            seq, last = int(head["seq"]), str(head["hash"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, OSError):
            return None
        if not hmac.compare_digest(str(head.get("mac", "")), _head_mac(self.key, seq, last)):
            return None
        return seq, last

    def _write_head(self, seq: int, last: str) -> None:
        # Written after the line is durable, without a sync of its own: a head lost in a crash
        # is an older head, and verify treats the head as a lower bound of the log's length.
        data = json.dumps({"seq": seq, "hash": last, "mac": _head_mac(self.key, seq, last)})
        fd = os.open(self.head_path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data.encode(), 0)
        finally:
            os.close(fd)

    def _rotated(self) -> list[Path]:
        """Rotated files, newest first."""
        found = []
        for n in range(1, self.keep + 1):
            path = self.path.with_name(f"{self.path.name}.{n}")
            if not path.exists():
                break
            found.append(path)
        return found

    def _rotate(self) -> None:
        oldest = self.path.with_name(f"{self.path.name}.{self.keep}")
        oldest.unlink(missing_ok=True)
        for n in range(self.keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{n}")
            if src.exists():
                src.rename(self.path.with_name(f"{self.path.name}.{n + 1}"))
        self.path.rename(self.path.with_name(f"{self.path.name}.1"))

    def record(self, event: str, *, user: str | None, peer: str | None = None,
               **details: Any) -> None:
        """Append one event; durable when it returns."""
        with self._lock:
            entry: dict[str, Any] = {
                "v": VERSION,
                "seq": self._seq + 1,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "event": event, "user": user, "peer": peer, "details": _bounded(details),
                "prev": self._prev,
            }
            entry["hash"] = _digest(self.key, entry)
            line = json.dumps(entry, ensure_ascii=True).encode() + b"\n"
            try:
                if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                    self._rotate()
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                             0o600)
                try:
                    os.write(fd, line)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
                self._write_head(entry["seq"], entry["hash"])
            except OSError as exc:
                raise InternalError(f"cannot write the audit log {self.path}: {exc.strerror}; "
                                    "check the disk and the log directory") from exc
            self._seq, self._prev = entry["seq"], entry["hash"]

    def tail(self, count: int) -> list[dict[str, Any]]:
        """The last ``count`` entries of the current file (damaged lines skipped)."""
        if count <= 0 or not self.path.exists():
            return []
        entries = []
        for raw in self.path.read_bytes().splitlines()[-count:]:
            try:
                entries.append(json.loads(raw))
            except ValueError:
                continue
        return entries

    def verify(self) -> VerifyResult:
        files = [*reversed(self._rotated()), self.path]
        files = [f for f in files if f.exists()]
        prev: str | None = None  # the oldest kept line's prev cannot be checked
        seq: int | None = None
        total = 0
        last_file, last_line = (str(files[-1]) if files else None), 0
        for path in files:
            with path.open("rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    total += 1
                    last_file, last_line = str(path), number
                    problem, entry = _check_line(self.key, raw, prev, seq)
                    if problem is not None:
                        bad_line = number
                        if problem.startswith("previous:"):  # line number-1 was changed
                            bad_line, problem = number - 1, problem[len("previous:"):]
                        return VerifyResult(False, total, [str(f) for f in files], str(path),
                                            bad_line, problem)
                    assert entry is not None
                    prev, seq = entry["hash"], entry["seq"]
        problem = self._check_head(seq or 0, prev)
        if problem is not None:
            return VerifyResult(False, total, [str(f) for f in files], last_file,
                                last_line or None, problem)
        return VerifyResult(True, total, [str(f) for f in files])

    def _check_head(self, seq: int, last: str | None) -> str | None:
        """Why the log's end does not match its recorded head, or None."""
        try:
            raw = self.head_path.read_bytes()
        except FileNotFoundError:
            return None if seq == 0 else f"its head {self.head_path.name} is missing"
        try:
            head = json.loads(raw)
            head_seq, head_hash = int(head["seq"]), str(head["hash"])
        except (ValueError, KeyError, TypeError):
            return f"its head {self.head_path.name} is damaged"
        if not hmac.compare_digest(str(head.get("mac", "")),
                                   _head_mac(self.key, head_seq, head_hash)):
            return f"its head {self.head_path.name} was altered"
        if seq < head_seq:
            return (f"it ends at entry {seq} but {head_seq} were written: the last lines were "
                    "deleted")
        if seq == head_seq and last != head_hash:
            return "its last entry is not the one recorded in its head: it was replaced"
        return None


def _check_line(key: bytes, raw: bytes, prev: str | None, seq: int | None
                ) -> tuple[str | None, dict[str, Any] | None]:
    try:
        entry = json.loads(raw)
        assert isinstance(entry, dict)
        own = entry["hash"]
    except (ValueError, KeyError, AssertionError, TypeError):
        return "not a valid audit entry", None
    if entry.get("v") != VERSION or not isinstance(own, str):
        return "not a keyed audit entry", None
    if not hmac.compare_digest(_digest(key, entry), own):
        return "its content does not match its hash: the line was edited", None
    if seq is not None and entry.get("seq") != seq + 1:
        return f"sequence jumps from {seq} to {entry.get('seq')}: lines are missing", None
    if prev is not None and entry.get("prev") != prev:
        return "previous:the next line does not chain to it: it was replaced", None
    return None, entry


def _last_line(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    return lines[-1].decode("ascii", "replace") if lines else None
