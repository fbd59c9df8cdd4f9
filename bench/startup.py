"""CLI start-up: `fetchml --help` and `fetchml info` against `python -c "import click"`.

Goal: both within 2x of importing click, on the same machine, in the same run.
Usage: python bench/startup.py [--runs 30]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import fetchml_command, running_daemon, throwaway_root


def timed(cmd: list[str], env: dict[str, str], runs: int) -> float:
    """Median wall time of ``runs`` runs, after one warm-up."""
    subprocess.run(cmd, env=env, capture_output=True, check=True)
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True, check=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--pyz", type=Path, help="also time this dist/fetchml.pyz")
    args = parser.parse_args()
    with throwaway_root("fml-bench-") as root, running_daemon(root / "state") as daemon:
        env, fetchml = daemon.env, fetchml_command()
        click = timed([sys.executable, "-c", "import click"], env, args.runs)
        helps = timed([*fetchml, "--help"], env, args.runs)
        info = timed([*fetchml, "info"], env, args.runs)
        pyz = None
        if args.pyz:
            pyz = (timed([sys.executable, str(args.pyz), "--help"], env, args.runs),
                   timed([sys.executable, str(args.pyz), "info"], env, args.runs))
    print(f"python -c 'import click'  {click * 1000:7.1f} ms")
    print(f"fetchml --help            {helps * 1000:7.1f} ms   {helps / click:.2f}x  (goal <= 2x)")
    print(f"fetchml info              {info * 1000:7.1f} ms   {info / click:.2f}x  (goal <= 2x)")
    if pyz:
        print(f"fetchml.pyz --help        {pyz[0] * 1000:7.1f} ms   {pyz[0] / helps:.2f}x of "
              "the installed entry point")
        print(f"fetchml.pyz info          {pyz[1] * 1000:7.1f} ms   {pyz[1] / info:.2f}x of "
              "the installed entry point")


if __name__ == "__main__":
    main()
