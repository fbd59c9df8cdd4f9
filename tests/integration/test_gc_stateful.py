"""A hypothesis state machine that interleaves sync, submit, run, prune, gc and daemon restarts
against a real daemon; after every step every live root's objects are present (fsck clean),
and after a collection with no grace no unreferenced object survives."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fetchml.cas.manifest import SnapshotManifest
from fetchml.client import Connection
from fetchml.client.transfer import sync_tree
from fetchml.errors import NotFound
from tests.conftest import DaemonProcess, make_daemon

# How long a temp file in the store may be a write in progress rather than a leftover.
IN_FLIGHT_S = 10.0
# A small pool of file contents, so that trees share objects (deduplication is the hard part).
POOL = [f"content {i}\n".encode() * (i + 1) for i in range(12)]


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="fml-gcsm-", dir="/tmp"))
        (self.root / "home").mkdir()
        self.daemon: DaemonProcess = make_daemon(self.root).start()
        self.conn: Connection = self.daemon.connect()
        self.synced: set[str] = set()  # snapshots stored and not yet collectable-and-collected
        self.jobs: set[str] = set()
        self.trees = 0

    def teardown(self) -> None:
        self.conn.close()
        self.daemon.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------------
    def live_roots(self) -> set[str]:
        jobs = self.conn.call("jobs.list", {"all_users": True, "limit": 100_000})["jobs"]
        roots = {j["snapshot"] for j in jobs} | {j["outputs"] for j in jobs if j["outputs"]}
        return roots | {p["snapshot"] for p in self.conn.call("snapshot.pins")["pins"]}

    def objects_of(self, snapshot: str) -> set[str]:
        manifest = self.conn.call("snapshot.get", {"snapshot": snapshot})["manifest"]
        return set(SnapshotManifest.decode(manifest).oids())

    def objects_on_disk(self) -> set[str]:
        return {p.parent.name + p.name for p in (self.daemon.state_dir / "objects").glob("??/*")
                if not p.name.startswith(".")}

    # -- rules ------------------------------------------------------------------------------
    @rule(picks=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=5))
    def sync(self, picks: list[int]) -> None:
        self.trees += 1
        tree = self.root / f"tree{self.trees}"
        tree.mkdir()
        for n, pick in enumerate(picks):
            (tree / f"f{n}.txt").write_bytes(POOL[pick])
        report = sync_tree(self.conn, tree, max_file_size=1 << 30)
        self.synced.add(report.snapshot)

    @precondition(lambda self: bool(self.synced))
    @rule(data=st.data(), writes=st.booleans())
    def submit(self, data: st.DataObject, writes: bool) -> None:
        snapshot = data.draw(st.sampled_from(sorted(self.synced)))
        argv = ["sh", "-c", "cp f0.txt $FETCHML_OUTPUT_DIR/out.txt" if writes else "true"]
        job = self.conn.call("jobs.submit", {"snapshot": snapshot, "jobs": [{"argv": argv}]})
        self.jobs.add(str(job["jobs"][0]["id"]))

    @precondition(lambda self: bool(self.jobs))
    @rule()
    def run_to_completion(self) -> None:
        done = self.conn.call("jobs.wait", {"jobs": sorted(self.jobs), "timeout": 30})
        assert not done["timed_out"]

    @rule(everything=st.booleans())
    def prune_and_collect(self, everything: bool) -> None:
        if self.jobs:
            self.run_to_completion()
        args = {"older_than": 0 if everything else 86400.0, "all_users": True, "gc_grace": 0.0}
        self.conn.call("admin.prune", args)
        if everything:
            self.jobs.clear()
        roots = self.live_roots()
        live = set().union(*(self.objects_of(s) for s in roots)) if roots else set()
        assert self.objects_on_disk() == live, "gc left garbage or took live objects"
        self.synced &= roots  # the rest were collected (no grace)

    @rule()
    def collect_with_grace(self) -> None:
        before = self.objects_on_disk()
        self.conn.call("admin.prune", {"older_than": 86400.0, "all_users": True})
        assert self.objects_on_disk() == before  # everything is younger than the default grace

    @rule()
    def restart(self) -> None:
        self.conn.close()
        self.daemon.stop()
        self.daemon.start()
        self.conn = self.daemon.connect()

    # -- invariants --------------------------------------------------------------------------
    def fsck_problems(self) -> list[dict[str, str]]:
        """fsck's problems once no write is in flight: a job that just ended may still be
        storing its outputs, whose temp file is only a problem if it stays."""
        deadline = time.monotonic() + IN_FLIGHT_S
        while True:
            problems: list[dict[str, str]] = self.conn.call(
                "admin.fsck", {"read_data": True})["problems"]
            if any(p["kind"] != "temp_file" for p in problems) or not problems \
                    or time.monotonic() > deadline:
                return problems
            time.sleep(0.05)

    @invariant()
    def every_live_root_is_whole(self) -> None:
        problems = self.fsck_problems()
        assert problems == [], problems
        for snapshot in self.live_roots() | self.synced:
            try:
                oids = self.objects_of(snapshot)
            except NotFound:
                raise AssertionError(f"live snapshot {snapshot[:12]} was collected") from None
            assert not self.conn.call("cas.missing", {"oids": sorted(oids)})["missing"]


StoreMachine.TestCase.settings = settings(
    max_examples=4, stateful_step_count=12, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
test_store_state_machine = StoreMachine.TestCase

