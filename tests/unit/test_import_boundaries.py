"""Which parts of fetchml may import which, checked on the real import graph.

Every module under ``fetchml/`` is parsed with ``ast``; every ``import`` and ``from ... import``
in it counts, wherever it stands: at the top of the module, inside a function (a lazy import,
run on the first call), or under ``if TYPE_CHECKING:`` (never run; for the type checker).
Relative imports are resolved against the importing module's package, and
``from fetchml.pkg import name`` is an import of the module ``fetchml.pkg.name`` when that
module exists, of the package ``fetchml.pkg`` otherwise.

Boundaries (over every import, lazy and TYPE_CHECKING ones included, unless said otherwise):

- ``fetchml.protocol`` and ``fetchml.cas`` import nothing of ``fetchml.daemon``,
  ``fetchml.client`` or ``fetchml.cli``: both are usable without a daemon;
- ``fetchml.client`` never imports aiohttp: the CLI starts fast and the client is light;
- ``fetchml.cli`` never imports ``fetchml.daemon``, except ``fetchml daemon`` itself
  (``fetchml/cli/daemon_cmd.py``), which imports ``fetchml.daemon.server`` inside the command
  to run the daemon in the same process;
- ``fetchml.daemon.supervise`` imports only the standard library, psutil, ``fetchml.errors``
  and itself: it runs in forked supervisors, which must start in milliseconds;
- ``fetchml.errors`` and ``fetchml.units``, which every part may import, import only the
  standard library;
- no import cycle among fetchml's modules through the imports run when a module is imported
  (top-level imports, those under ``try``/``if`` at module level included): the failure. Lazy
  imports break cycles on purpose, since they run later; the one cycle they close is the
  handler registry's (``handlers.load_all`` imports the handler modules, which import the
  registry), and no other may appear. TYPE_CHECKING imports never run and are not checked.

Redis: imported only when a ``redis://`` store is configured. A SQLite daemon (a real one, in a
subprocess, running a job) and every CLI command run without ``redis`` in ``sys.modules``; the
CLI's commands load neither aiohttp nor anything of ``fetchml.daemon`` either.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import make_daemon

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "fetchml"

TOP, LAZY, TYPING = "top-level", "lazy", "TYPE_CHECKING"


@dataclass(frozen=True)
class Edge:
    source: str  # the importing module
    target: str  # a fetchml module, or the top-level name of a foreign one
    kind: str  # TOP, LAZY or TYPING
    line: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target} ({self.kind})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, kind: str = TOP) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement under ``tree``, with where it stands."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, kind
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _imports(node, TYPING if kind == TYPING else LAZY)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), TYPING)
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), kind)
        else:
            yield from _imports(node, kind)


def _target(name: str) -> str:
    """A fetchml module's name as is; a foreign module by its top-level package."""
    return name if name == "fetchml" or name.startswith("fetchml.") else name.split(".")[0]


def edges_of(module: str) -> list[Edge]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node, kind in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            names = []
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                names.append(submodule if submodule in MODULES else origin)
        if names == ["__future__"]:
            continue
        found += [Edge(module, _target(name), kind, node.lineno) for name in names]
    return found


GRAPH: dict[str, list[Edge]] = {module: edges_of(module) for module in MODULES}
ALL_EDGES = [edge for edges in GRAPH.values() for edge in edges]


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_is_read_from_every_module() -> None:
    # guards the walk itself: modules found, relative and from-imports resolved
    assert "fetchml.daemon.supervise.supervisor" in MODULES
    assert "fetchml.cli.daemon_cmd" in MODULES
    targets = {edge.target for edge in GRAPH["fetchml.daemon.supervise.supervisor"]}
    assert {"fetchml.daemon.supervise.records", "psutil", "os"} <= targets
    unknown = [e for e in ALL_EDGES if within(e.target, "fetchml") and e.target not in MODULES]
    assert unknown == []


@pytest.mark.parametrize("package", ["fetchml.protocol", "fetchml.cas"])
def test_protocol_and_cas_import_nothing_of_daemon_client_or_cli(package: str) -> None:
    forbidden = ("fetchml.daemon", "fetchml.client", "fetchml.cli")
    bad = [str(e) for e in ALL_EDGES
           if within(e.source, package) and any(within(e.target, f) for f in forbidden)]
    assert bad == []


def test_the_client_never_imports_aiohttp() -> None:
    bad = [str(e) for e in ALL_EDGES
           if within(e.source, "fetchml.client") and e.target == "aiohttp"]
    assert bad == []


@pytest.mark.parametrize("leaf", ["fetchml.errors", "fetchml.units"])
def test_errors_and_units_import_only_the_standard_library(leaf: str) -> None:
    # every part imports them, the forked supervisor included (errors)
    bad = [str(e) for e in GRAPH[leaf] if e.target not in sys.stdlib_module_names]
    assert bad == []


# The one way the CLI reaches the daemon's code: `fetchml daemon` runs it in its own process.
CLI_DAEMON_EXCEPTION = ("fetchml.cli.daemon_cmd", "fetchml.daemon.server", LAZY)


def test_the_cli_never_imports_the_daemon_but_to_run_it() -> None:
    reaching = [e for e in ALL_EDGES
                if within(e.source, "fetchml.cli") and within(e.target, "fetchml.daemon")]
    bad = [str(e) for e in reaching if (e.source, e.target, e.kind) != CLI_DAEMON_EXCEPTION]
    assert bad == []
    assert reaching, "fetchml daemon no longer imports the daemon lazily: update this test"


SERVICES = ("jobs", "store", "supervise", "isolation", "security", "cluster", "datasets",
            "observe")


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_knows_the_core_or_the_app(service: str) -> None:
    """Services get what they use from core.py; none imports it back, not even for types."""
    package = f"fetchml.daemon.{service}"
    assert any(within(module, package) for module in MODULES)
    bad = [str(e) for e in ALL_EDGES if within(e.source, package)
           and e.target in ("fetchml.daemon.core", "fetchml.daemon.app",
                            "fetchml.daemon.server", "fetchml.daemon.session")]
    assert bad == []


def test_the_supervisor_side_imports_only_the_standard_library_psutil_and_errors() -> None:
    allowed = {"psutil", "fetchml.errors"}
    bad = [str(e) for e in ALL_EDGES
           if within(e.source, "fetchml.daemon.supervise")
           and not within(e.target, "fetchml.daemon.supervise")
           and e.target not in allowed and e.target not in sys.stdlib_module_names]
    assert bad == []


def _cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module, or with a self-loop (Tarjan)."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for edge in edges:
        if edge.target in MODULES:
            graph[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for nxt in sorted(graph[module]):
            if nxt not in index:
                visit(nxt)
                low[module] = min(low[module], low[nxt])
            elif nxt in on_stack:
                low[module] = min(low[module], index[nxt])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in graph[module]:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_through_the_imports_run_at_import_time() -> None:
    assert _cycles([e for e in ALL_EDGES if e.kind == TOP]) == []


def test_lazy_imports_close_no_cycle_but_the_handler_registrys() -> None:
    runtime = _cycles([e for e in ALL_EDGES if e.kind != TYPING])
    assert [c for c in runtime if not all(within(m, "fetchml.daemon.handlers") for m in c)] == []


def test_the_cycle_check_finds_cycles() -> None:
    a, b = "fetchml.errors", "fetchml.config"
    assert _cycles([Edge(a, b, TOP, 1), Edge(b, a, TOP, 1)]) == [sorted([a, b])]


# -- redis only with a redis:// store ---------------------------------------------------------

def _modules_after(code: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """``sys.modules`` of a fresh interpreter after running ``code`` (which prints nothing)."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    output = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, check=True,
                            capture_output=True, text=True, timeout=60, env=env).stdout
    return list(json.loads(output.splitlines()[-1]))


def _redis(modules: list[str]) -> list[str]:
    return [m for m in modules if m == "redis" or m.startswith("redis.")]


CLI_COMMANDS = sorted(module for module in MODULES
                      if within(module, "fetchml.cli") and module.endswith("_cmd"))


def test_every_cli_command_imports_and_parses_without_redis_aiohttp_or_the_daemon() -> None:
    code = (
        "import contextlib, io, sys\n"
        "from fetchml.cli.main import cli\n"
        f"for module in {CLI_COMMANDS!r}:\n"
        "    __import__(module)\n"
        "for name in sorted(cli.list_commands(None)):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        cli.main([name, '--help'], prog_name='fetchml')\n"
    )
    modules = _modules_after(code)
    assert set(CLI_COMMANDS) <= set(modules)
    assert _redis(modules) == []
    assert [m for m in modules if within(m, "aiohttp") or within(m, "fetchml.daemon")] == []


def test_a_sqlite_daemon_runs_a_job_without_redis(short_tmp: Path) -> None:
    # `python -m fetchml daemon`, run by a wrapper that writes sys.modules to a file when the
    # daemon exits, after it served a few requests and ran a job
    modules_file = short_tmp / "modules.json"
    wrapper = (
        "import atexit, json, runpy, sys\n"
        "target = sys.argv[1]\n"
        "def dump() -> None:\n"
        "    with open(target, 'w') as out:\n"
        "        json.dump(sorted(sys.modules), out)\n"
        "atexit.register(dump)\n"
        "sys.argv = ['fetchml', *sys.argv[2:]]\n"
        "runpy.run_module('fetchml', run_name='__main__', alter_sys=True)\n"
    )
    daemon = make_daemon(short_tmp, FETCHML_STORE="sqlite")
    with daemon.log_path.open("ab") as log:
        daemon.proc = subprocess.Popen(
            [sys.executable, "-c", wrapper, str(modules_file), "daemon", "--state-dir",
             str(daemon.state_dir)],
            env=daemon.env, stdout=log, stderr=subprocess.STDOUT, cwd=short_tmp)
    try:
        daemon.wait_ready()
        project = short_tmp / "project"
        project.mkdir()
        (project / "train.py").write_text("print('trained')\n")
        done = daemon.cli("queue", "--follow", "--", "python3", "train.py", cwd=project)
        assert done.returncode == 0 and "trained" in done.stdout, done.stderr
        for command in (("status", "--all"), ("info",), ("dataset", "list")):
            assert daemon.cli(*command).returncode == 0, command
    finally:
        assert daemon.stop() == 0, daemon.log()
    modules = json.loads(modules_file.read_text())
    assert "fetchml.daemon.app" in modules
    assert "fetchml.daemon.store.sqlite" in modules
    assert _redis(modules) == []
