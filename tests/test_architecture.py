"""Imports run one way: flowsort's leaf helpers <- engines <- streamer <- trainer <- bench <- the `flowsort` command.

Every module is parsed (not imported), so imports inside functions count as
much as those at the top: a lower floor never reaches up, and no modules import
each other in a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flowsort", "engines", "streamer", "trainer", "bench")
FLOORS = {"flowsort": 0, "engines": 1, "streamer": 2, "trainer": 3, "bench": 4}
COMMAND_MODULES = {"flowsort.cli": 5, "flowsort.__main__": 6}  # the command sits on top of every package


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported(name: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The known modules that module ``name`` imports anywhere in ``source`` (``from a import b`` counts ``a.b``
    when that is a module, else ``a``)."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
                break
    return targets


def floor(module: str) -> int:
    return COMMAND_MODULES.get(module, FLOORS[module.split(".")[0]])


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported(name, path.read_text(), path.name == "__init__.py", set(modules))
            for name, path in modules.items()}


def test_every_package_is_parsed(graph: dict[str, set[str]]) -> None:
    assert {name.split(".")[0] for name in graph} == set(PACKAGES)
    assert "streamer.service" in graph and "trainer.cli.train" in graph


def test_imports_never_reach_a_higher_floor(graph: dict[str, set[str]]) -> None:
    upward = sorted(f"{source} -> {target}" for source, targets in graph.items() for target in targets
                    if floor(target) > floor(source))
    assert not upward, "imports that reach up a floor:\n" + "\n".join(upward)


def test_no_modules_import_each_other_in_a_circle(graph: dict[str, set[str]]) -> None:
    circles = strongly_connected(graph)
    assert not circles, "modules importing each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in circles)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the groups of more than one module that reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.get(target, ())))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_the_checker_sees_function_level_and_relative_imports_and_circles() -> None:
    """The checks above cannot pass by seeing nothing."""
    known = {"engines", "engines.a", "engines.b", "trainer.c"}
    source = "import numpy\nfrom . import b\n\ndef f():\n    from trainer.c import thing\n"
    assert imported("engines.a", source, False, known) == {"engines.b", "trainer.c"}
    assert floor("trainer.c") > floor("engines.a")
    assert strongly_connected({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]
    assert strongly_connected({"x": {"y"}, "y": set()}) == []
