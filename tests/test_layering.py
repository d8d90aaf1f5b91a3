"""Layering of spsr_hpc, read from the source with ast (nothing is imported):

- no import cycle between files (an import inside a function counts: it is a cycle all the same);
- no module imports a layer above its own:
  data/distributed/weights/files → models/metrics/preflight → losses/inference → config/evaluate → train
  → nse/report → demo/bench (launch/ scripts sit on top and are not in the package).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "spsr_hpc"

# Layer of each top-level module or sub-package of spsr_hpc (higher may import lower, or its own).
LAYERS = {
    # 0: no project imports above the standard library, torch, numpy, Pillow
    "data": 0, "distributed": 0, "weights": 0, "device": 0, "labels": 0, "files": 0,
    "precision": 0,  # spsr_hpc/precision.py: bf16 autocast helpers
    "models": 1, "metrics": 1, "preflight": 1,
    "losses": 2, "inference": 2,
    "config": 3, "evaluate": 3,
    "train": 4,
    "nse": 5, "report": 5,
    "demo": 6, "bench": 6,
}

# Import cycles tolerated for now: none (the bench/train.py <-> bench/train_vs_reference.py
# circle went when both took their shared set-up from bench/train_setup.py).
KNOWN_CYCLES: list[frozenset[str]] = []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The file an imported dotted name lives in: the longest prefix that is a module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """spsr_hpc module -> the spsr_hpc modules (files) it imports, anywhere in its body."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import name`: name is a submodule or an attribute of pkg
                names = [f"{base}.{a.name}" for a in node.names]
            for n in names:
                if n == "spsr_hpc" or n.startswith("spsr_hpc."):
                    target = _resolve(n, modules)
                    if target and target != mod:
                        targets.add(target)
        graph[mod] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

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
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _layer_key(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package's own __init__


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_reads_function_level_and_relative_imports(tmp_path):
    graph = import_graph()
    # report.loss_curves imports read_jsonl inside the function: the edge is seen
    assert "spsr_hpc.train.logging" in graph["spsr_hpc.report"]
    # `from spsr_hpc import distributed as sdist` resolves to the file spsr_hpc/distributed.py
    assert "spsr_hpc.distributed" in graph["spsr_hpc.train.logging"]


def test_no_import_cycles_between_files():
    found = [c for c in cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_no_module_imports_a_layer_above_it():
    graph = import_graph()
    unplaced = sorted({k for k in map(_layer_key, graph) if k is not None and k not in LAYERS})
    assert unplaced == [], f"give {unplaced} a layer in LAYERS (tests/test_layering.py)"
    upward = [
        f"{mod} (layer {LAYERS[_layer_key(mod)]}) imports {t} (layer {LAYERS[_layer_key(t)]})"
        for mod, targets in sorted(graph.items())
        if _layer_key(mod) is not None
        for t in sorted(targets)
        if _layer_key(t) is not None and LAYERS[_layer_key(t)] > LAYERS[_layer_key(mod)]
    ]
    assert upward == []


def test_training_layer_does_not_import_the_report_layer():
    graph = import_graph()
    offenders = [m for m, ts in graph.items() if m.startswith("spsr_hpc.train") and "spsr_hpc.report" in ts]
    assert offenders == []
    # the public names stay where their users import them from
    from spsr_hpc import labels, report
    from spsr_hpc.train import logging

    assert report.label_columns is labels.label_columns and report.HEADER_PX == labels.HEADER_PX
    assert report.tile_row is labels.tile_row and logging.label_columns is labels.label_columns
    assert callable(logging.read_jsonl)
