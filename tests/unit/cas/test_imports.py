from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_the_cas_package_imports_nothing_from_the_daemon_side() -> None:
    code = (
        "import json, sys\n"
        "import fetchml.cas.fsck, fetchml.cas.hashing, fetchml.cas.ignore\n"
        "import fetchml.cas.manifest, fetchml.cas.materialize, fetchml.cas.objects\n"
        "import fetchml.cas.paths, fetchml.cas.scan\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    modules = json.loads(output)
    forbidden = ("aiohttp", "asyncio", "click", "fetchml.daemon", "fetchml.cli", "fetchml.client")
    assert [m for m in modules if m.split(".")[0] in forbidden or m.startswith(forbidden)] == []
    fetchml_modules = {m for m in modules if m.startswith("fetchml")}
    # errors and units are leaves of the standard library only (test_import_boundaries)
    assert fetchml_modules <= {"fetchml", "fetchml.errors", "fetchml.units"} | {
        m for m in fetchml_modules if m.startswith("fetchml.cas")
    }
