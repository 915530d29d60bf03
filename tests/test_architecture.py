"""The package's shape: no import cycle anywhere in ``merging`` (every import statement, function-local ones
included), methods never reach the cache or the job queue, the library never imports Streamlit, and
``ui.py`` asks the library instead of knowing cache file names."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "merging"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(source: str, this: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The ``merging`` modules that module ``this`` imports anywhere in ``source`` (``from pkg import submodule``
    counts as the submodule; a relative import resolves against ``this``)."""
    package = this if is_package else this.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in out if m in known and m != this}


def import_graph() -> nx.DiGraph:
    known = modules()
    graph = nx.DiGraph()
    for name, path in known.items():
        graph.add_node(name)
        graph.add_edges_from((name, target) for target in imported(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known))
    return graph


def test_the_package_has_no_import_cycle():
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles)


def test_the_graph_walker_sees_function_local_and_relative_imports():
    """The cycle test is only as good as its walker: a lazy import inside a function is an edge."""
    source = "def f():\n    from merging import runs\n    from . import base\n    import merging.jobs as j\n"
    assert imported(source, "merging.methods.probe", False, modules()) == {"merging.runs", "merging.methods.base", "merging.jobs"}
    graph = import_graph()
    graph.add_edges_from([("merging.methods.surgery", "merging.runs")])  # what surgery.py did before the inputs
    assert list(nx.simple_cycles(graph))


def test_methods_never_import_runs_or_jobs():
    graph = import_graph()
    for name in graph:
        if name.startswith("merging.methods."):
            assert not {"merging.runs", "merging.jobs", "merging.sweeps", "merging.artifacts"} & set(graph.successors(name)), name


def test_the_library_never_imports_streamlit():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "streamlit" for n in names), path


def test_ui_names_no_cache_file():
    text = (ROOT / "ui.py").read_text(encoding="utf-8")
    for needle in (".safetensors", "manifest.json", "result.json", "status.json", "suite_dir", "features_dir", "run_dir", '"runs"', '"features"'):
        assert needle not in text, needle
