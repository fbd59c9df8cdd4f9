"""The audit log's keyed chain and head: edits, cut ends and forged chains are all found."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from fetchml.daemon.security.audit import AuditLog, audit_key

KEY = audit_key(b"s" * 32)


def _log(tmp_path: Path, entries: int = 5, user: str = "ada") -> AuditLog:
    audit = AuditLog(tmp_path / "logs" / "audit.log", KEY)
    audit.open()
    for n in range(entries):
        audit.record("jobs.submit", user=user, peer="uid 1000", jobs=[n])
    return audit


def _lines(audit: AuditLog) -> list[bytes]:
    return audit.path.read_bytes().splitlines(keepends=True)


def test_an_untouched_log_verifies(tmp_path: Path) -> None:
    audit = _log(tmp_path)
    result = audit.verify()
    assert result.ok and result.lines == 5, result


def test_deleting_the_last_lines_is_found(tmp_path: Path) -> None:
    audit = _log(tmp_path)
    audit.path.write_bytes(b"".join(_lines(audit)[:-2]))
    result = audit.verify()
    assert not result.ok
    assert result.reason == "it ends at entry 3 but 5 were written: the last lines were deleted"


def test_a_cut_log_keeps_its_gap_after_a_restart(tmp_path: Path) -> None:
    audit = _log(tmp_path)
    audit.path.write_bytes(b"".join(_lines(audit)[:-2]))
    reopened = AuditLog(audit.path, KEY)
    reopened.open()
    reopened.record("auth.success", user="ada")
    result = reopened.verify()
    assert not result.ok and "lines are missing" in (result.reason or ""), result


def test_a_rewritten_chain_without_the_key_is_found(tmp_path: Path) -> None:
    """Rewrite one line and recompute every hash after it, as someone without the key must:
    with a guessed key (here, the key of another secret) nothing holds together."""
    audit = _log(tmp_path)
    entries = [json.loads(line) for line in _lines(audit)]
    entries[2]["user"] = "mallory"
    guessed = audit_key(b"g" * 32)
    prev = entries[1]["hash"]
    for entry in entries[2:]:
        entry["prev"] = prev
        body = {k: v for k, v in entry.items() if k != "hash"}
        text = json.dumps(body, sort_keys=True, ensure_ascii=True).encode()
        entry["hash"] = prev = hmac.new(guessed, text, hashlib.sha256).hexdigest()
    audit.path.write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in entries))
    result = audit.verify()
    assert not result.ok and result.bad_line == 3, result
    assert result.reason == "its content does not match its hash: the line was edited"


def test_an_altered_head_is_found(tmp_path: Path) -> None:
    audit = _log(tmp_path)
    head = json.loads(audit.head_path.read_bytes())
    head["seq"] = 3
    audit.head_path.write_text(json.dumps(head))
    result = audit.verify()
    assert not result.ok and result.reason == "its head audit.log.head was altered", result


def test_a_replaced_last_line_is_found_by_the_head(tmp_path: Path) -> None:
    """Another valid line with the same sequence number does not take the last one's place."""
    audit = _log(tmp_path)
    other = _log(tmp_path / "other", user="bob")
    lines = _lines(audit)
    lines[-1] = _lines(other)[-1]
    audit.path.write_bytes(b"".join(lines))
    assert not audit.verify().ok


def test_an_unkeyed_log_of_an_older_version_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.log"
    path.parent.mkdir()
    old = {"seq": 1, "event": "auth.success", "prev": "0" * 64, "hash": "ab" * 32}
    path.write_text(json.dumps(old) + "\n")
    audit = AuditLog(path, KEY)
    audit.open()
    audit.record("auth.success", user="ada")
    assert audit.verify().ok
    kept = list(path.parent.glob("audit.log.*.unkeyed"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["hash"] == "ab" * 32


def test_the_chain_continues_across_rotation(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.log", KEY, max_bytes=600)
    audit.open()
    for n in range(12):
        audit.record("jobs.submit", user="ada", jobs=[n])
    result = audit.verify()
    assert result.ok and result.lines == 12 and len(result.files) > 1, result
