"""Slow unauthenticated connections against a TLS listener, while the local admin works.

Holds up to ``--connections`` (default 5,000) connections from 200 loopback addresses against a
daemon's TLS listener: each completes TLS when the daemon lets it, sends one header line and
then one more every two seconds, and reconnects after a pause when the daemon closes it. Every
100 ms a client on the Unix socket runs ``host.info`` (connect, hello, call). Prints the
``info`` latencies, the daemon's RSS while attacked and after the connections close, and what
the daemon refused. Loopback only; bounded in time (``--seconds``) and in connection attempts.

Goals: every ``info`` answers within 1 s; RSS under 300 MB while attacked, under 150 MB after.
Usage: python bench/slow_connections.py [--connections 5000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import resource
import ssl
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
from common import machine_line, percentile, running_daemon, throwaway_root

from fetchml.client import Target, connect

SOURCES = [f"127.0.0.{n}" for n in range(2, 202)]  # 200 client addresses
MAX_ATTEMPTS = 200_000  # a bound on connection attempts, whatever the duration


@dataclass
class Attack:
    stop: bool = False
    attempts: int = 0
    live: int = 0
    most_live: int = 0
    closed_by_daemon: int = 0
    failed: int = 0


async def _slot(attack: Attack, port: int, source: str, context: ssl.SSLContext) -> None:
    while not attack.stop and attack.attempts < MAX_ATTEMPTS:
        attack.attempts += 1
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="localhost",
                local_addr=(source, 0)), 20)
            attack.live += 1
            attack.most_live = max(attack.most_live, attack.live)
            try:
                writer.write(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n")
                while not attack.stop:
                    try:
                        if await asyncio.wait_for(reader.read(1), 2.0) == b"":
                            attack.closed_by_daemon += 1
                            break
                    except TimeoutError:
                        writer.write(b"X-Slow: 1\r\n")  # one more header line, never the end
            finally:
                attack.live -= 1
        except (OSError, ssl.SSLError, TimeoutError):
            attack.failed += 1
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        if not attack.stop:
            await asyncio.sleep(1.0)


def _attack(attack: Attack, port: int, ca: Path, connections: int) -> None:
    context = ssl.create_default_context(cafile=str(ca))

    async def run() -> None:
        slots = [asyncio.create_task(_slot(attack, port, SOURCES[n % len(SOURCES)], context))
                 for n in range(connections)]
        while not attack.stop:
            await asyncio.sleep(0.1)
        await asyncio.wait_for(asyncio.gather(*slots, return_exceptions=True), 60)

    asyncio.run(run())


def _make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out",
         str(cert), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True)
    return cert, key


def _refusals(metrics_url: str) -> dict[str, int]:
    with urllib.request.urlopen(metrics_url, timeout=10) as answer:
        text = answer.read().decode()
    found = re.findall(r'fetchml_connections_refused_total\{reason="(\w+)"\} ([0-9.e+]+)', text)
    return {reason: int(float(value)) for reason, value in found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * args.connections + 1024), hard))

    with throwaway_root() as root:
        cert, key = _make_cert(root)
        config = root / "daemon.yaml"
        config.write_text(f"tls_cert: {cert}\ntls_key: {key}\nmetrics_listen: 127.0.0.1:0\n")
        print(machine_line(root))
        with running_daemon(root / "state", "--config", str(config),
                            "--listen", "127.0.0.1:0") as daemon:
            info = daemon.runtime_info
            port = int(str(info["url"]).rsplit(":", 1)[1].split("/")[0])
            assert daemon.proc is not None
            process = psutil.Process(daemon.proc.pid)
            rss_before = process.memory_info().rss
            attack = Attack()
            attacker = threading.Thread(target=_attack,
                                        args=(attack, port, cert, args.connections))
            attacker.start()
            latencies: list[float] = []
            peak_rss = rss_before
            target = Target(socket_path=str(daemon.socket))
            ends = time.monotonic() + args.seconds
            while time.monotonic() < ends:
                started = time.perf_counter()
                with connect(target) as conn:
                    conn.call("host.info")
                latencies.append(time.perf_counter() - started)
                peak_rss = max(peak_rss, process.memory_info().rss)
                time.sleep(max(0.0, 0.1 - (time.perf_counter() - started)))
            attack.stop = True
            attacker.join(120)
            settle = time.monotonic() + 15
            while time.monotonic() < settle:  # the daemon's deadline closes what is left
                time.sleep(0.5)
            rss_after = process.memory_info().rss
            refusals = _refusals(str(info["metrics"]))

    slow = sum(1 for x in latencies if x > 1.0)
    mb = 1 / 2**20
    print(f"attack: {args.connections} connection slots from {len(SOURCES)} addresses for "
          f"{args.seconds:g} s: {attack.attempts} attempts, at most {attack.most_live} open "
          f"at once (client side), {attack.closed_by_daemon} closed by the daemon after "
          f"opening, {attack.failed} refused or failed at connect/TLS")
    print(f"daemon refusals: {refusals}")
    p50, p99 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000
    print(f"info over the Unix socket: {len(latencies)} calls, p50 {p50:.1f} ms, p99 "
          f"{p99:.1f} ms, max {max(latencies) * 1000:.1f} ms, {slow} over 1 s (goal 0)")
    print(f"daemon RSS: {rss_before * mb:.0f} MB before, peak {peak_rss * mb:.0f} MB while "
          f"attacked (goal < 300), {rss_after * mb:.0f} MB after (goal < 150)")


if __name__ == "__main__":
    main()
