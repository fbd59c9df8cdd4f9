"""Metric series: parsing lines, bounded series, tailing a file being written, the kept copy,
and the dashboard's client-side series and braille plot."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fetchml.cli.tui.model import JobBoard, gpu_rows, requeue_spec
from fetchml.cli.tui.plot import WatchedMetrics, braille_lines
from fetchml.daemon.jobs.model import Job, JobState
from fetchml.daemon.observe.series import (
    MAX_LINE_BYTES,
    MAX_NAME,
    MAX_SERIES,
    READ_CHUNK,
    AttemptMetrics,
    Series,
    StoredMetrics,
    TailState,
    evenly,
    metrics_of_file,
    parse_line,
    read_new_lines,
    read_series_file,
    series_file_limit,
    write_series_file,
)
from fetchml.daemon.observe.training import MetricsTracker
from fetchml.daemon.supervise.rundir import RunDir
from fetchml.protocol.job import read_job


def line(**values: object) -> bytes:
    return json.dumps(values).encode() + b"\n"


# -- parsing ----------------------------------------------------------------------------------
def test_parse_line_takes_numbers_and_ignores_the_rest() -> None:
    assert parse_line(b'{"step": 3, "loss": 0.5, "acc": 1, "phase": "eval", "ok": true}') \
        == (3.0, {"loss": 0.5, "acc": 1.0})
    assert parse_line(b'{"loss": 0.5}') == (None, {"loss": 0.5})
    step, values = parse_line(b'{"step": 1, "loss": NaN, "big": 1e999}') or (0, {})
    assert step == 1 and math.isnan(values["loss"]) and values["big"] == math.inf
    assert parse_line(b'{"step": 1, "huge": ' + b"9" * 400 + b"}") == (1.0, {})


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"text"', b"3", b'{"step": "x"}',
                                 b'{"step": NaN, "loss": 1}', b'{"step": true}', b"\xff\xfe",
                                 b"[" * 100_000])
def test_parse_line_refuses_what_is_not_a_metrics_record(raw: bytes) -> None:
    assert parse_line(raw) is None


# -- bounded series ---------------------------------------------------------------------------
@given(st.integers(min_value=2, max_value=64), st.integers(min_value=0, max_value=3000))
def test_a_series_stays_bounded_evenly_spread_with_the_latest_point(capacity: int,
                                                                    count: int) -> None:
    series = Series(capacity)
    for i in range(count):
        series.add(float(i), float(i) * 2)
    steps, values = series.points()
    assert len(steps) <= capacity and series.offered == count
    if count:
        assert steps[0] == 0 and steps[-1] == count - 1 and values[-1] == 2 * (count - 1)
        kept = list(steps) if series.last_kept else list(steps)[:-1]
        gaps = {b - a for a, b in itertools.pairwise(kept)}
        assert gaps <= {float(series.stride)}  # evenly spread
    if count >= capacity:
        assert len(steps) >= capacity // 2  # thinned, never emptied


@given(st.integers(min_value=0, max_value=500), st.integers(min_value=0, max_value=50))
def test_evenly_picks_first_and_last_and_never_more_than_asked(count: int, wanted: int) -> None:
    picked = evenly(count, wanted)
    assert len(picked) == min(count, wanted)
    assert picked == sorted(set(picked))
    if picked and wanted >= 2:
        assert picked[0] == 0 and picked[-1] == count - 1
    if count and wanted == 1:
        assert picked == [count - 1]


def test_steps_default_to_the_record_number_and_series_are_capped() -> None:
    metrics = AttemptMetrics(1, 1, capacity=10)
    metrics.add(None, {"loss": 1.0})
    metrics.add(None, {"loss": 0.5})
    assert list(metrics.points()["loss"][0]) == [0.0, 1.0]
    metrics.add(5.0, {f"m{i}": float(i) for i in range(MAX_SERIES + 5)})
    metrics.add(6.0, {"x" * (MAX_NAME + 1): 1.0})
    assert len(metrics.series) == MAX_SERIES and metrics.dropped == 6 + 1  # loss was one


def test_a_reply_is_thinned_to_what_was_asked() -> None:
    metrics = AttemptMetrics(1, 1, capacity=1000)
    for i in range(100):
        metrics.add(float(i), {"loss": 1 / (i + 1)})
    wire = StoredMetrics.of(metrics).to_wire(5)
    assert [p[0] for p in wire["series"]["loss"]] == [0, 25, 50, 74, 99]
    assert isinstance(wire["series"]["loss"][0][0], int) and wire["counts"] == {"loss": 100}
    assert StoredMetrics.of(metrics).to_wire(1, {"acc"})["series"] == {}


# -- tailing a file being written -------------------------------------------------------------
def test_tail_waits_for_the_newline_and_the_end_takes_a_last_partial_line(tmp_path: Path) -> None:
    path, state = tmp_path / "metrics.jsonl", TailState()
    assert read_new_lines(path, state, final=False).records == []  # not written yet
    path.write_bytes(line(step=1, loss=1.0) + b'{"step": 2, "lo')
    batch = read_new_lines(path, state, final=False)
    assert batch.records == [(1.0, {"loss": 1.0})] and state.partial == b'{"step": 2, "lo'
    with path.open("ab") as handle:
        handle.write(b'ss": 0.5}\n\n   \n{"step": 3, "loss": 0.25}')
    assert read_new_lines(path, state, final=False).records == [(2.0, {"loss": 0.5})]
    batch = read_new_lines(path, state, final=True)
    assert batch.records == [(3.0, {"loss": 0.25})] and batch.malformed == 0


def test_tail_counts_an_over_long_line_once_and_goes_on(tmp_path: Path) -> None:
    path, state = tmp_path / "metrics.jsonl", TailState()
    path.write_bytes(b'{"loss": ' + b" " * (MAX_LINE_BYTES + 10))
    assert read_new_lines(path, state, final=False).malformed == 1
    with path.open("ab") as handle:
        handle.write(b" " * 1000)  # still the same line
    assert read_new_lines(path, state, final=False).malformed == 0
    with path.open("ab") as handle:
        handle.write(b"1}\n" + line(loss=2.0) + b"garbage\n")
    batch = read_new_lines(path, state, final=False)
    assert batch.records == [(None, {"loss": 2.0})] and batch.malformed == 1


def test_tail_reads_big_files_a_chunk_at_a_time_and_starts_over_when_rewritten(
        tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(line(step=i, loss=i / 7) for i in range(30_000)))
    state, records, reads = TailState(), 0, 0
    while True:
        batch = read_new_lines(path, state, final=False)
        records, reads = records + len(batch.records), reads + 1
        if not batch.more:
            break
    assert records == 30_000 and reads == path.stat().st_size // READ_CHUNK + 1
    path.write_bytes(line(step=0, loss=9.0))  # the job started its file again
    batch = read_new_lines(path, state, final=False)
    assert batch.restarted and batch.records == [(0.0, {"loss": 9.0})]


def test_tail_never_follows_a_symlink_nor_reads_a_fifo(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(line(step=1, password=1234))
    link = tmp_path / "metrics.jsonl"
    link.symlink_to(secret)
    assert read_new_lines(link, TailState(), final=True).records == []
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    assert read_new_lines(fifo, TailState(), final=True).records == []


def test_metrics_of_a_whole_file_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(line(step=i, loss=1 / (i + 1)) for i in range(5000)) + b"{bad\n")
    metrics = metrics_of_file(path, 7, 2, capacity=100)
    steps, _ = metrics.points()["loss"]
    assert len(steps) <= 100 and steps[-1] == 4999
    assert metrics.records == 5000 and metrics.malformed == 1


# -- the kept copy ----------------------------------------------------------------------------
def test_series_file_round_trips_and_refuses_damage(tmp_path: Path) -> None:
    metrics = AttemptMetrics(7, 2, capacity=50)
    for i in range(120):
        metrics.add(float(i), {"loss": 1 / (i + 1), "acc": math.nan if i == 119 else i / 120})
    metrics.malformed = 3
    path = tmp_path / "metrics.msgpack"
    write_series_file(path, metrics)
    stored = read_series_file(path, capacity=50)
    assert stored is not None and stored.attempt == 2 and stored.malformed == 3
    assert stored.counts == {"loss": 120, "acc": 120} and stored.records == 120
    assert list(stored.points["loss"][0]) == list(metrics.points()["loss"][0])
    assert math.isnan(stored.points["acc"][1][-1])
    assert path.stat().st_size < series_file_limit(50)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.msgpack"]  # no temp file left
    path.write_bytes(b"\x93garbage")
    assert read_series_file(path, capacity=50) is None
    path.write_bytes(b"\0" * (series_file_limit(50) + 1))
    assert read_series_file(path, capacity=50) is None
    assert read_series_file(tmp_path / "missing", capacity=50) is None


# -- the dashboard's side ---------------------------------------------------------------------
def test_watched_metrics_keep_order_reset_and_stay_bounded() -> None:
    watched = WatchedMetrics()
    watched.apply({"reset": True, "series": {"loss": [[0, 1.0]], "acc": [[0, 0.1]]}})
    assert watched.selected == "loss" and watched.names() == ["loss", "acc"]
    watched.apply({"series": {"loss": [[i, 1 / i] for i in range(1, 10_000)]}})
    assert len(watched.points()) <= 4000 and watched.points()[-1][0] == 9999
    assert watched.cycle() == "acc" and watched.cycle() == "loss"
    watched.apply({"reset": True, "series": {}, "malformed": 2})
    assert watched.points() == [] and watched.malformed == 2


def test_braille_plot_draws_a_falling_line_inside_its_box() -> None:
    rows = braille_lines([(i, 10 - i) for i in range(11)], width=10, height=3)
    assert len(rows) == 3 and all(len(row) == 10 for row in rows)
    assert rows[0][0] != "\u2800" and rows[-1][-1] != "\u2800"  # top left to bottom right
    assert rows[0][-1] == "\u2800" and rows[-1][0] == "\u2800"
    flat = braille_lines([(0, 1.0), (1, 1.0), (2, math.nan)], width=4, height=2)
    assert any(ch != "\u2800" for row in flat for ch in row)
    assert braille_lines([], 5, 2) == ["\u2800" * 5] * 2 and braille_lines([(0, 1)], 0, 3) == []


def job(job_id: int, state: str, owner: str = "alice", **more: object) -> dict[str, object]:
    return {"id": job_id, "state": state, "owner": owner, "name": f"job{job_id}",
            "priority": 5, "gpu_ids": [], **more}


def test_job_board_filters_sorts_and_forgets_old_finished_jobs() -> None:
    board = JobBoard()
    board.replace([job(1, "succeeded"), job(2, "running", "bob"), job(3, "queued")])
    assert [j["id"] for j in board.visible()] == [3, 2, 1]
    board.cycle_state()  # active
    assert [j["id"] for j in board.visible()] == [3, 2]
    board.user = "bob"
    assert [j["id"] for j in board.visible()] == [2]
    board.user, board.state_filter = None, 0
    board.sort_by("state")
    assert [j["id"] for j in board.visible()] == [2, 3, 1]
    board.sort_by("state")  # again: reversed
    assert [j["id"] for j in board.visible()] == [1, 3, 2]
    with pytest.raises(ValueError, match="cannot sort"):
        board.sort_by("colour")
    board.replace([job(i, "succeeded") for i in range(2100)] + [job(5000, "running")])
    assert len(board.jobs) == 2000 and 5000 in board.jobs and 0 not in board.jobs


def test_gpu_rows_say_who_holds_each_gpu_and_requeue_keeps_the_options() -> None:
    host = {"gpus": [{"index": 0, "name": "H200", "memory": 150 * 2**30},
                     {"index": 1, "name": "H200", "memory": 0}, {"index": 2, "name": "H200"}]}
    rows = gpu_rows(host, [2], [job(9, "running", gpu_ids=[0]), job(8, "succeeded", gpu_ids=[1])])
    assert [r.holder for r in rows] == ["job 9 (alice)", "in use", "free"]
    assert rows[0].memory == "150.0 GiB" and rows[1].memory == "-"
    original = {"argv": ["python", "train.py"], "name": "t", "env": {"A": "1"}, "workdir": "src",
                "priority": 8, "cpus": 2, "memory": 2**30, "gpus_requested": 1, "timeout": 60.0,
                "max_attempts": 3, "labels": {"k": "v"}, "datasets": ["d@1"],
                "isolation": "bwrap", "after": [4]}
    spec = requeue_spec(original)  # protocol 1's spelling, as an older daemon sends it
    assert spec["retries"] == 2 and spec["gpus"] == 1 and spec["datasets"] == ["d@1"]
    assert requeue_spec(read_job(original)) == spec  # and protocol 2's
    assert "after" not in spec and spec["isolation"] == "bwrap" and spec["workdir"] == "src"


# -- the tracker, built with what it uses (no daemon) -----------------------------------------

async def test_the_tracker_follows_a_running_attempt_and_keeps_its_series_when_it_ends(
        tmp_path: Path) -> None:
    def run_dir_of(job_id: int, attempt: int) -> Path:
        return tmp_path / str(job_id) / str(attempt)

    def attempt(state: JobState) -> Job:
        return Job(id=7, name="t", owner="me", snapshot="0" * 64, argv=("true",), state=state,
                   created_at=1.0, attempt=1, host="h", started_at=2.0)

    run_dir_of(7, 1).mkdir(parents=True)
    tracker = MetricsTracker("h", 100, run_dir_of)
    running = attempt(JobState.RUNNING)
    tracker.create_file(running, run_dir_of(7, 1))
    assert tracker.environment(running, run_dir_of(7, 1)) == {
        "FETCHML_METRICS_FILE": str(run_dir_of(7, 1) / "metrics.jsonl")}
    async with tracker.running([running]):
        with tracker.feed(frozenset({7})) as feed:
            with open(run_dir_of(7, 1) / "metrics.jsonl", "ab") as out:
                out.write(line(step=1, loss=0.5) + line(step=2, loss=0.25))
            item = await asyncio.wait_for(feed.queue.get(), 5)
            assert item.kind == "points" and item.records == 2
            current = tracker.current(7)
            assert current is not None and list(current.points["loss"][1]) == [0.5, 0.25]
            tracker.job_changed(attempt(JobState.SUCCEEDED))
            while (item := await asyncio.wait_for(feed.queue.get(), 5)).kind != "end":
                pass
    assert tracker.current(7) is None
    assert RunDir(run_dir_of(7, 1)).series.is_file()
    kept = await tracker.load(attempt(JobState.SUCCEEDED))
    assert list(kept.points["loss"][1]) == [0.5, 0.25]
