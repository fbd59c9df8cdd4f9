"""The declared policy as a user meets it, and one spelling of a job per protocol version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from fetchml.client.transfer import sync_tree
from fetchml.errors import BadRequest, PermissionDenied
from fetchml.protocol import PROTOCOL_VERSION, encode
from tests.conftest import DaemonProcess
from tests.integration.test_session import raw_ws, say_hello


def reply_to(ws: Any, request: dict[str, Any]) -> dict[str, Any]:
    ws.send_binary(encode(request))
    while True:
        frame: dict[str, Any] = msgpack.unpackb(ws.receive().data)
        if frame.get("id") == request["id"] and "event" not in frame:
            return frame


def test_a_missing_permission_is_refused_in_the_same_words(daemon: DaemonProcess,
                                                            short_tmp: Path) -> None:
    (short_tmp / "p").mkdir()
    with daemon.connect() as admin:
        key = admin.call("admin.users.add", {"name": "ana", "role": "analyst"})["key"]
        snapshot = sync_tree(admin, short_tmp / "p", max_file_size=1 << 20).snapshot
    with daemon.connect(api_key=key) as ana:
        with pytest.raises(PermissionDenied) as refused:
            ana.call("jobs.submit", {"snapshot": snapshot, "jobs": [{"argv": ["true"]}]})
        assert refused.value.code == "permission_denied"
        assert refused.value.message == ("user ana (role analyst) may not do this "
                                         "(jobs:create); ask an admin for a role that allows it")
        with pytest.raises(BadRequest, match="needs argument 'jobs'"):  # arguments first
            ana.call("jobs.submit", {"snapshot": snapshot})
        assert "time" in ana.call("host.ping")  # no permission needed
        assert ana.call("jobs.list")["jobs"] == []


def test_gpus_and_retries_mean_the_same_on_submit_and_on_a_job(daemon: DaemonProcess,
                                                                short_tmp: Path) -> None:
    (short_tmp / "p").mkdir()
    with daemon.connect() as conn:
        assert conn.hello["protocol"] == PROTOCOL_VERSION == 2
        snapshot = sync_tree(conn, short_tmp / "p", max_file_size=1 << 20).snapshot
        [job] = conn.call("jobs.submit", {"snapshot": snapshot, "jobs": [
            {"argv": ["true"], "retries": 2, "cpus": 1}]})["jobs"]
        assert job["gpus"] == 0 and job["gpu_ids"] == [] and job["retries"] == 2
        assert "max_attempts" not in job and "gpus_requested" not in job
    ws = raw_ws(daemon)
    assert say_hello(ws)["result"]["protocol"] == 1  # an old client
    old = reply_to(ws, {"id": 1, "op": "jobs.get", "args": {"job": str(job["id"])}})["result"]
    assert old["gpus_requested"] == 0 and old["gpus"] == [] and old["max_attempts"] == 3
    assert "retries" not in old and "gpu_ids" not in old
    listed = reply_to(ws, {"id": 2, "op": "jobs.list", "args": {}})["result"]["jobs"]
    assert [j["max_attempts"] for j in listed] == [3]
    ws.close()
