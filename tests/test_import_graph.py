"""The package layering of nemo_dmc: every import between its packages goes down a floor.

A unit is a package ``nemo_dmc.<pkg>`` (``kernels/`` installs as ``nemo_dmc.kernels``) or a
top-level module (``nemo_dmc/train.py`` is ``nemo_dmc.train``). Every import counts, lazy
ones inside functions and relative ones included; ``if TYPE_CHECKING:`` imports too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
SOURCES = ((REPO / "nemo_dmc", "nemo_dmc"), (REPO / "kernels", "nemo_dmc.kernels"))

# Each unit's floor: a unit imports only units on strictly lower floors.
FLOORS: dict[str, int] = {
    # F0: the command-line tools' output settings (nothing of nemo_dmc; every entry point)
    "nemo_dmc.quiet": 0,
    "nemo_dmc": 1,  # the root package (its version only)
    # F1: pure-torch DMC math and plain shared dataclasses; tokenizers and corpora
    "nemo_dmc.core": 1,
    "nemo_dmc.data": 1,
    "nemo_dmc.config_help": 1,  # config keys' meanings from the schema docstrings (--help)
    # F2: Triton kernels and their references; KV-compression methods
    "nemo_dmc.kernels": 2,
    "nemo_dmc.methods": 2,
    # F3: megatron-core modules; checkpoint and run-record resolution; the paged KV cache
    "nemo_dmc.megatron": 3,
    "nemo_dmc.checkpoints": 3,
    "nemo_dmc.kvcache": 3,
    # F4: training, inference, NeMo 2 and Hugging Face glue
    "nemo_dmc.training": 4,
    "nemo_dmc.inference": 4,
    "nemo_dmc.nemo": 4,
    "nemo_dmc.hf": 4,
    # F5: conversion, evaluation and the command-line entry points
    "nemo_dmc.convert": 5,
    "nemo_dmc.evaluate": 5,
    "nemo_dmc.train": 5,
    "nemo_dmc.generate": 5,
}
MAX_FLOORS = 5

Edge = tuple[str, str]  # (importing unit, imported unit)


def _unit(module: str) -> Optional[str]:
    """The unit of a dotted module name, or ``None`` outside nemo_dmc."""
    parts = module.split(".")
    if parts[0] != "nemo_dmc":
        return None
    return ".".join(parts[:2])


def _module_name(path: Path, base: Path, package: str) -> tuple[str, bool]:
    """Dotted name of a source file, and whether it is a package ``__init__``."""
    rel = path.relative_to(base).with_suffix("").parts
    is_package = rel[-1] == "__init__"
    parts = rel[:-1] if is_package else rel
    return ".".join((package, *parts)), is_package


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Absolute names a module imports (relative imports resolved), with line numbers."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from nemo_dmc import core`` imports the unit nemo_dmc.core
            names = [f"{base}.{a.name}" for a in node.names] if base == "nemo_dmc" else [base]
            found += [(name, node.lineno) for name in names]
    return found


@lru_cache(maxsize=None)
def import_graph() -> tuple[dict[Edge, list[str]], frozenset[str]]:
    """``{(unit, imported unit): ["file:line", ...]}`` and every unit with a source file."""
    edges: dict[Edge, list[str]] = defaultdict(list)
    units = set()
    for base, package in SOURCES:
        for path in sorted(base.rglob("*.py")):
            module, is_package = _module_name(path, base, package)
            source = _unit(module)
            units.add(source)
            tree = ast.parse(path.read_text(), filename=str(path))
            for name, line in _imported_modules(tree, module, is_package):
                target = _unit(name)
                if target is not None and target != source:
                    edges[(source, target)].append(f"{path.relative_to(REPO)}:{line}")
    return dict(edges), frozenset(units)


def _describe(edges: dict[Edge, list[str]], selected: list[Edge]) -> str:
    def floor(unit: str) -> str:
        return f"F{FLOORS[unit]}" if unit in FLOORS else "no floor"

    return "\n".join(f"  {src} ({floor(src)}) -> {dst} ({floor(dst)}): "
                     f"{', '.join(edges[(src, dst)])}" for src, dst in sorted(selected))


def _strongly_connected(nodes: set[str], succ: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(succ.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return components


def _successors(edges: dict[Edge, list[str]]) -> dict[str, set[str]]:
    succ: dict[str, set[str]] = defaultdict(set)
    for src, dst in edges:
        succ[src].add(dst)
    return succ


def test_package_imports_form_no_cycles():
    edges, units = import_graph()
    succ = _successors(edges)
    cycles = [c for c in _strongly_connected(set(units) | {d for _, d in edges}, succ)
              if len(c) > 1]
    inside = [(s, d) for s, d in edges if any(s in c and d in c for c in cycles)]
    assert not cycles, (f"packages importing each other: {cycles}; the imports among them:\n"
                        + _describe(edges, inside))


def test_every_package_is_placed_on_a_floor():
    edges, units = import_graph()
    unplaced = sorted((set(units) | {d for _, d in edges}) - set(FLOORS))
    touching = [(s, d) for s, d in edges if s in unplaced or d in unplaced]
    assert not unplaced, (f"units without a floor: {unplaced}; add each to FLOORS in "
                          f"{Path(__file__).name} (F1 core/data ... F5 entry points). "
                          "Their imports:\n" + _describe(edges, touching))


def test_every_import_goes_to_a_strictly_lower_floor():
    edges, _ = import_graph()
    bad = [(s, d) for s, d in edges
           if s not in FLOORS or d not in FLOORS or FLOORS[d] >= FLOORS[s]]
    assert not bad, ("imports that do not go to a strictly lower floor (FLOORS in "
                     f"{Path(__file__).name}):\n" + _describe(edges, bad))


def test_the_longest_import_chain_spans_at_most_five_floors():
    edges, units = import_graph()
    succ = _successors(edges)
    components = _strongly_connected(set(units) | {d for _, d in edges}, succ)
    component_of = {v: i for i, c in enumerate(components) for v in c}
    chains: dict[int, list[str]] = {}  # longest chain from a component (Tarjan: sinks first)
    for i, component in enumerate(components):
        below = [chains[component_of[w]] for v in component for w in succ.get(v, ())
                 if component_of[w] != i]
        chains[i] = ["/".join(component)] + max(below, key=len, default=[])
    longest = max(chains.values(), key=len, default=[])
    assert len(longest) <= MAX_FLOORS, (f"the longest import chain spans {len(longest)} floors "
                                        f"(at most {MAX_FLOORS}): {' -> '.join(longest)}")
