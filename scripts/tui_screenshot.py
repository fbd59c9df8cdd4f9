#!/usr/bin/env python3
"""Save docs/tui.svg: `fetchml tui` against a real daemon that runs a learning-rate sweep.

Starts a throwaway daemon (4 declared GPUs, no real one needed), queues a 3-job sweep with
`fetchml queue --grid` and a 2-GPU job that has to wait, drives the dashboard with Textual's
pilot until the selected job's loss curve has points, and saves the screen as SVG.

    python scripts/tui_screenshot.py [OUT.svg]      # default docs/tui.svg
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fetchml.cli.tui.app import Dashboard  # noqa: E402
from fetchml.client import Target, connect  # noqa: E402
from fetchml.client.local_daemon import LocalDaemon, clean_env  # noqa: E402

SIZE = (100, 30)  # columns, rows: a roomy terminal; 80x24 works too
POINTS_WANTED = 150  # points on the plot before the picture is taken
TIMEOUT_S = 60.0
TRAIN = """\
import argparse, json, math, os, random, time
parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--steps", type=int, default=600)
args = parser.parse_args()
rng = random.Random(int(args.lr * 1000))
metrics = open(os.environ["FETCHML_METRICS_FILE"], "a")
loss = 2.5
for step in range(args.steps):
    loss = max(0.05, loss - args.lr * 0.02 * loss + rng.gauss(0, 0.004))
    acc = 1 - loss / 2.6
    print(f"step {step:4d}  loss {loss:.4f}  acc {acc:.3f}", flush=True)
    metrics.write(json.dumps({"step": step, "loss": loss, "acc": acc}) + "\\n")
    metrics.flush()
    time.sleep(0.03)
with open(os.path.join(os.environ["FETCHML_OUTPUT_DIR"], "model.json"), "w") as out:
    json.dump({"lr": args.lr, "loss": loss}, out)
"""


def fetchml(env: dict[str, str], cwd: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "fetchml", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fetchml {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


async def capture(socket: Path, root: Path, out: Path) -> None:
    app = Dashboard(lambda: connect(Target(socket_path=str(socket))), pull_dir=root)
    async with app.run_test(size=SIZE) as pilot:
        deadline = time.monotonic() + TIMEOUT_S
        while app.table.row_count < 4:
            assert time.monotonic() < deadline, "the jobs did not show"
            await pilot.pause(0.1)
        await pilot.press("down", "down", "down")  # to the sweep's first job, lr=0.3
        while app.plot.point_count < POINTS_WANTED:
            assert time.monotonic() < deadline, "the plot did not fill"
            await pilot.pause(0.1)
        await pilot.pause(0.3)
        out.parent.mkdir(parents=True, exist_ok=True)
        app.save_screenshot(out.name, str(out.parent))
    app.feeds.stop()


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "tui.svg"
    root = Path(tempfile.mkdtemp(prefix="fml-shot-", dir="/tmp"))  # short: socket paths
    env = clean_env(FETCHML_GPUS="0,1,2,3", FETCHML_CPUS="8", HOME=str(root),
                    PYTHONPATH=str(REPO))
    project = root / "project"
    project.mkdir()
    (project / "train.py").write_text(TRAIN)
    daemon = LocalDaemon(root / "state", env, log_path=root / "daemon.log")
    try:
        daemon.start()
        env = daemon.cli_env()
        fetchml(env, project, "queue", "--json", "--gpus", "1", "--name", "sweep",
                "--grid", "lr=0.3,0.1,0.03", "--", "python3", "train.py", "--lr", "{lr}")
        fetchml(env, project, "queue", "--json", "--gpus", "2", "--name", "big",
                "--", "python3", "train.py", "--lr", "0.2")
        asyncio.run(capture(daemon.socket, root, out))
        jobs = json.loads(fetchml(env, project, "status", "--json"))["jobs"]
        fetchml(env, project, "cancel", *(str(job["id"]) for job in jobs))
    finally:
        if daemon.running:
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
