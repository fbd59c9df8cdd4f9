"""The TCP gate's accept loop: failures to accept are survived and logged once per interval."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import pytest

from fetchml.daemon.security import gate as gate_module
from fetchml.daemon.security.gate import ConnectionGate
from fetchml.daemon.tasks import cancel_and_wait


async def test_accept_errors_are_survived_and_logged_once_per_interval(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    gate = ConnectionGate(policy=None, deadline=1.0, per_address=1, total=1)
    loop = asyncio.get_running_loop()
    calls = 0

    async def out_of_descriptors(sock: socket.socket) -> tuple[socket.socket, object]:
        nonlocal calls
        calls += 1
        if calls > 20:
            await asyncio.Event().wait()  # then nothing more to accept
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(loop, "sock_accept", out_of_descriptors)
    monkeypatch.setattr(gate_module, "ACCEPT_BACKOFF_S", 0.0)
    with socket.socket() as listener, caplog.at_level(logging.ERROR, "fetchml"):
        task = asyncio.create_task(gate.serve(listener, asyncio.Protocol, None))
        for _ in range(200):
            if calls > 20:
                break
            await asyncio.sleep(0.01)
        assert not task.done()  # the listener goes on
        await cancel_and_wait(task)
    assert gate.counts.accept_errors == 20
    logged = [r for r in caplog.records if "cannot accept TCP connections" in r.getMessage()]
    assert len(logged) == 1, logged
