"""The house is layered (README "What runs": layers point one way): the library ``fedseq/`` imports no
service folder, services import the library and not each other (an attacker worker is a client
worker with another population, so ``attacker -> client`` is the one allowed arrow), only the
``fedseq`` command (``cli/``) knows every service, and no module imports itself round a cycle.
Read from the source with ``ast`` (function-level imports count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedseq", "server", "client", "attacker", "orchestrator", "cli")
ALLOWED = {  # package -> the packages it may import
    "fedseq": {"fedseq"},
    "server": {"server", "fedseq"},
    "client": {"client", "fedseq"},
    "attacker": {"attacker", "client", "fedseq"},
    "orchestrator": {"orchestrator", "fedseq"},
    "cli": set(PACKAGES),
}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Modules ``path`` imports (absolute names; relative imports resolved; ``from X import y``
    counts as X.y when X.y is a module, else X)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "v1" not in p.parts}
    return {m: {i for i in _imports(p, m) if i in files and i != m} for m, p in files.items()}


def test_the_scan_sees_every_package_and_known_arrows():
    g = _graph()
    assert {m.split(".")[0] for m in g} == set(PACKAGES)
    assert "fedseq.engine" in g["server.service"] and "fedseq.engine" in g["orchestrator.run"]
    assert "server.aggregation" in g["cli.plugins"] and "client.app" in g["attacker.app"]


def test_layers_point_one_way():
    bad = sorted(f"{m} -> {i}" for m, deps in _graph().items() for i in deps
                 if i.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_cycle():
    g = _graph()
    # Tarjan's strongly connected components; a package's __init__ re-exporting its own
    # submodules is not a cycle of the code's dependencies, so edges into a package's own
    # __init__ from its submodules are left out
    edges = {m: {i for i in deps if not (m.startswith(i + ".") and i in g)} for m, deps in g.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
