"""A file far bigger than any buffer syncs in bounded memory on both sides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from tests.conftest import DaemonProcess

BIG_FILE_BYTES = 2 << 30
# The budget each process must stay under while moving the big file.
PEAK_RSS_LIMIT = 200 * 1024 * 1024
# Runs a command and writes [exit code, peak RSS in KiB] to a file: wait4 reports the child's
# own peak RSS, however briefly it peaked. The command is started from this small process, not
# from the test process: Linux carries a process's peak RSS across fork and exec into its
# children, and a test worker may have grown large.
MEASURED = """\
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump([os.waitstatus_to_exitcode(status), usage.ru_maxrss], out)
"""


def peak_rss(pid: int) -> int:
    """The high-water mark of a running process's resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.mark.slow
def test_a_2gib_file_syncs_in_bounded_memory(daemon_process: DaemonProcess,
                                             short_tmp: Path) -> None:
    daemon = daemon_process  # its own process: its peak RSS is the daemon's alone
    tree = short_tmp / "proj"
    tree.mkdir()
    big = tree / "weights.bin"
    with big.open("wb") as stream:
        # sparse except for a few real blocks: quick to create, still hashed and sent in full
        for offset in range(0, BIG_FILE_BYTES, 256 << 20):
            stream.seek(offset)
            stream.write(os.urandom(4096))
        stream.truncate(BIG_FILE_BYTES)
    (tree / "train.py").write_text("print('hi')\n")
    env = dict(daemon.env, FETCHML_SOCKET=str(daemon.socket), FETCHML_MAX_FILE_SIZE="3g")
    usage_path = short_tmp / "usage.json"
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, str(usage_path),
         sys.executable, "-m", "fetchml", "sync", "--json", str(tree)],
        env=env, capture_output=True, check=False)
    exit_code, max_rss_kib = json.loads(usage_path.read_text())
    assert exit_code == 0 and done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    assert report["sent_bytes"] == report["bytes"] == BIG_FILE_BYTES + 12
    client_peak = max_rss_kib * 1024
    assert daemon.proc is not None
    daemon_peak = peak_rss(daemon.proc.pid)
    print(f"peak RSS: CLI {client_peak / 2**20:.0f} MiB, daemon {daemon_peak / 2**20:.0f} MiB")
    assert client_peak < PEAK_RSS_LIMIT
    assert daemon_peak < PEAK_RSS_LIMIT
    with daemon.connect() as conn:
        got = conn.call("snapshot.get", {"snapshot": report["snapshot"]})
    rows = {row[0]: row for row in msgpack.unpackb(got["manifest"])[2]}
    oid = rows["weights.bin"][4].hex()
    stored = daemon.state_dir / "objects" / oid[:2] / oid[2:]
    assert stored.stat().st_size == BIG_FILE_BYTES
