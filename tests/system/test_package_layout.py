"""The installed package: one name, the mapping of folders to names, and its boundaries.

``paramserver/`` is the package ``paramserver`` (what server and client share), ``app/`` is
``paramserver.server`` and ``client/`` is ``paramserver.client`` (README, "Layout"). Each import
check runs in a fresh interpreter started outside the repository: inside it, the current
directory would make the bare folders importable.

* nothing named ``app`` or ``client`` is importable after installation, and no module of the
  project, its tests, benchmarks or examples imports those bare names;
* dependency directions: the client loads no server framework, the server never loads httpx,
  the math imports only numpy, numba and the shared configs;
* no import cycle between the project's modules (the graph is built from the source's AST,
  imports inside functions and ``TYPE_CHECKING`` blocks included);
* the wheel holds ``paramserver`` (and its dist-info) alone, and works where it is unpacked.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Import name prefix -> the folder it is installed from (pyproject.toml's package-dir).
PACKAGE_DIRS = {
    "paramserver": REPO / "paramserver",
    "paramserver.server": REPO / "app",
    "paramserver.client": REPO / "client",
}


def run_fresh(code: str, *, cwd: Path, isolated_site: bool = False) -> str:
    """Run ``code`` in a new interpreter in ``cwd``; returns what it printed."""
    argv = [sys.executable, *(["-S"] if isolated_site else []), "-c", textwrap.dedent(code)]
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def loaded_after(statement: str, tmp_path: Path) -> set[str]:
    """The top-level names in ``sys.modules`` after ``statement`` in a fresh interpreter."""
    out = run_fresh(
        f"""
        import json, sys
        {statement}
        print(json.dumps(sorted(sys.modules)))
        """,
        cwd=tmp_path,
    )
    return set(json.loads(out.strip().splitlines()[-1]))


def project_modules() -> dict[str, Path]:
    """Every module of the installed package: import name -> source file."""
    out: dict[str, Path] = {}
    for prefix, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def imported_names(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The modules ``path`` (module ``name``) imports, anywhere in its source.

    ``from pkg import x`` names ``pkg.x`` when that is a module of ours, else ``pkg``.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                full = f"{module}.{alias.name}"
                yield full if full in known else module


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {
        name: {m for m in imported_names(name, path, known) if m in known and m != name}
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# --- one installed name ------------------------------------------------------------------------


def test_only_paramserver_is_importable(tmp_path: Path) -> None:
    out = run_fresh(
        """
        import importlib.util, json
        import paramserver, paramserver.server, paramserver.client
        print(json.dumps({
            "app": importlib.util.find_spec("app") is not None,
            "client": importlib.util.find_spec("client") is not None,
            "files": [m.__file__ for m in (paramserver, paramserver.server, paramserver.client)],
        }))
        """,
        cwd=tmp_path,
    )
    found = json.loads(out)
    assert found["app"] is False and found["client"] is False
    assert [Path(f).parent.name for f in found["files"]] == ["paramserver", "app", "client"]


def test_the_public_names(tmp_path: Path) -> None:
    out = run_fresh(
        """
        import paramserver, paramserver.client
        from paramserver import AsyncClient, Client, InvalidRequest, SessionState, optimizers
        assert Client is paramserver.client.Client and AsyncClient is paramserver.client.AsyncClient
        assert issubclass(InvalidRequest, paramserver.client.ServerError)
        assert SessionState is paramserver.messages.SessionState
        assert optimizers.Adam().class_name == "Adam"
        assert set(paramserver.__all__) <= set(dir(paramserver))
        for name in paramserver.__all__:
            getattr(paramserver, name)
        try:
            paramserver.nothing_here
        except AttributeError:
            print("ok")
        """,
        cwd=tmp_path,
    )
    assert out.strip() == "ok"


BARE_IMPORT_DIRS = ("paramserver", "app", "client", "tests", "benchmarks", "examples")


def test_no_module_imports_a_bare_folder_name() -> None:
    offenders = []
    for folder in BARE_IMPORT_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    if name.split(".")[0] in ("app", "client"):
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    assert not offenders, "\n".join(offenders)


#: Python embedded in the CI scripts and the Dockerfile imports the installed names too.
EMBEDDED_PYTHON = (".ci/run", ".ci/docker-check", ".ci/typecheck", "Dockerfile")
BARE_IMPORT = re.compile(r"^\s*(from|import)\s+(app|client)\b|\b(app|client)\.cli\b", re.M)


def test_the_ci_scripts_import_no_bare_folder_name() -> None:
    offenders = [
        f"{name}: {m.group(0).strip()}"
        for name in EMBEDDED_PYTHON
        for m in BARE_IMPORT.finditer((REPO / name).read_text(encoding="utf-8"))
    ]
    assert not offenders, "\n".join(offenders)
    assert BARE_IMPORT.search("x = 1\nimport client\n")  # the pattern finds what it should
    assert BARE_IMPORT.search("python -c 'import tensorflow, app.cli'")


# --- dependency directions ---------------------------------------------------------------------

SERVER_STACK = {"fastapi", "starlette", "uvicorn", "numba", "pydantic_settings", "tensorflow"}


def test_the_client_loads_no_server_stack(tmp_path: Path) -> None:
    loaded = loaded_after(
        "import paramserver.client\n        from paramserver import Client, optimizers",
        tmp_path,
    )
    assert "httpx" in loaded  # the check itself works
    assert not loaded & SERVER_STACK
    assert not any(m.startswith("paramserver.server") for m in loaded)
    # nor the frameworks: paramserver.client.keras and .torch import them, the client does not
    assert not loaded & {"torch", "tensorflow", "keras"}


def test_the_server_never_loads_httpx(tmp_path: Path) -> None:
    # Every module of the server, then the app built and started (its lifespan run).
    loaded = loaded_after(
        """
        import asyncio, pkgutil, importlib
        import paramserver.server
        for info in pkgutil.walk_packages(paramserver.server.__path__, "paramserver.server."):
            if info.name != "paramserver.server.__main__":
                importlib.import_module(info.name)
        from paramserver.server.main import create_app
        from paramserver.server.settings import Settings
        app = create_app(Settings(warm_up_kernels=False))
        async def start_and_stop():
            async with app.router.lifespan_context(app):
                pass
        asyncio.run(start_and_stop())
        """,
        tmp_path,
    )
    assert "fastapi" in loaded and "paramserver.server.tf_trainer" in loaded
    assert "httpx" not in loaded
    assert "tensorflow" not in loaded
    assert not any(m.startswith("paramserver.client") for m in loaded)


#: What the math may import: numpy, numba (and ml_dtypes, numpy's bfloat16 dtype), the
#: standard library and the shared configs (optimizers, constraints, error codes).
MATH_MAY_IMPORT = {
    "numpy",
    "numba",
    "ml_dtypes",
    "paramserver.optimizers",
    "paramserver.constraints",
    "paramserver.reductions",
    "paramserver.codes",
    # row-sparse gradients: the Rows type and the duplicate-summing of paramserver.sparse
    # (numpy only)
    "paramserver.sparse",
}


def test_the_math_imports_only_numpy_numba_and_the_shared_configs(tmp_path: Path) -> None:
    modules = project_modules()
    known = set(modules)
    math_modules = {n: p for n, p in modules.items() if n.startswith("paramserver.server.optim")}
    assert "paramserver.server.optim.engine" in math_modules
    bad = []
    for name, path in math_modules.items():
        for imported in imported_names(name, path, known):
            top = imported.split(".")[0]
            if (
                imported in MATH_MAY_IMPORT
                # llvmlite: numba's own backend, asked which CPU the kernel cache is for
                or top in ("numpy", "numba", "llvmlite", "ml_dtypes", "__future__")
                or top in sys.stdlib_module_names
                or imported.startswith("paramserver.server.optim")
            ):
                continue
            bad.append(f"{name} imports {imported}")
    assert not bad, "\n".join(bad)
    # And at run time: importing the math loads no HTTP, storage or wire stack.
    loaded = loaded_after("import paramserver.server.optim", tmp_path)
    ours = {m for m in loaded if m.startswith("paramserver")}
    assert ours <= {
        "paramserver",
        "paramserver.codes",
        "paramserver.constraints",
        "paramserver.optimizers",
        "paramserver.reductions",
        "paramserver.sparse",
        "paramserver.server",
    } | {m for m in ours if m.startswith("paramserver.server.optim")}
    assert not loaded & {"fastapi", "starlette", "httpx", "msgpack", "pydantic", "uvicorn"}


# --- no cycles ---------------------------------------------------------------------------------


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "paramserver.server.service" in graph["paramserver.server.main"]  # the graph is real
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


# --- the wheel ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (path,) = out.glob("paramserver-*.whl")
    return path


def test_the_wheel_holds_only_paramserver(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"paramserver"}, sorted(top)
    assert len(dist_info) == 1
    for expected in (
        "paramserver/__init__.py",
        "paramserver/py.typed",
        "paramserver/wire.py",
        "paramserver/messages.py",
        "paramserver/server/main.py",
        "paramserver/server/optim/engine.py",
        "paramserver/server/persistence/journal.py",
        "paramserver/server/api/sessions.py",
        "paramserver/client/sync.py",
    ):
        assert expected in names
    assert "paramserver = paramserver.server.cli:main" in scripts


def test_the_unpacked_wheel_works_on_its_own(wheel: Path, tmp_path: Path) -> None:
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    site_packages = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    # -S: no .pth file runs, so the editable install's import hook is not there; the
    # dependencies come from this environment's site-packages.
    out = run_fresh(
        f"""
        import sys
        sys.path[:0] = [{str(unpacked)!r}, {str(site_packages)!r}]
        import importlib.util
        import paramserver.server.main, paramserver.client
        from paramserver import Client
        assert importlib.util.find_spec("app") is None
        assert importlib.util.find_spec("client") is None
        print(paramserver.server.main.__file__)
        print(paramserver.client.__file__)
        """,
        cwd=tmp_path,
        isolated_site=True,
    )
    server_file, client_file = out.split()
    assert Path(server_file) == unpacked / "paramserver" / "server" / "main.py"
    assert Path(client_file) == unpacked / "paramserver" / "client" / "__init__.py"
