"""The shape of prefixlab/: no import circle, imports that follow the wing table, no module
that holds several concerns (too many lines).

No import circle, counting imports inside functions too.

A function-level import hides a circle from Python (it runs after both modules have loaded)
but not from a reader: the two modules still depend on each other. That is how
interpret -> plots -> interpret once hid inside `inspect_run`. The graph here is read from the
source with `ast`, so it sees every import statement wherever it sits, including under
`if TYPE_CHECKING:`. A submodule does not depend on its package's __init__ (as in grimp).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prefixlab"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its source."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package that holds this module
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import mod` imports the submodule; `from mod import name` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import a.b.c`: the deepest known one
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan), as a path a -> ... -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_within(graph, group) for group in groups]


def _path_within(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A shortest cycle through the group's first module, for the message."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return group


def test_prefixlab_has_no_import_circle():
    cycles = import_cycles(import_graph(PACKAGE))
    assert not cycles, "import circles in prefixlab/: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_check_finds_a_circle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from pkg.sub import c\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    (pkg / "d.py").write_text("import pkg.a\n")  # depends on the circle, is not part of it
    graph = import_graph(pkg)
    assert graph["pkg.sub.c"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


# The wings and what each may import besides itself and the root modules (errors, files).
# (`prefixlab serve` launches the API app, so cli may import ui.)
# Imports flow one way: ui/cli/bench -> workbench -> serve -> runs -> figures -> interpret
# -> engine -> data. A row says what a wing may use, so a new arrow is a decision made here.
ROOT_MODULES = {"prefixlab", "prefixlab.errors", "prefixlab.files"}
WINGS: dict[str, set[str]] = {
    "data": set(),
    "engine": {"data"},
    "interpret": {"engine", "data"},
    "figures": {"interpret"},
    "runs": {"figures", "interpret", "engine", "data"},
    "serve": {"runs", "engine", "data"},
    "workbench": {"serve", "runs", "figures", "interpret", "engine", "data"},
    # The UI talks to the workbench; from lower wings only run settings, states and errors
    # (runs), charts of the data and of training (figures) and who may connect (serve).
    "ui": {"workbench", "serve", "runs", "figures"},
    "cli": {"ui", "workbench", "serve", "runs", "interpret", "figures", "engine", "data"},
    "bench": {"serve", "runs", "figures", "interpret", "engine", "data"},
    "__main__": {"cli"},
}


def wing_of(module: str) -> str | None:
    """prefixlab.engine.prefix -> engine; the root modules belong to no wing."""
    if module in ROOT_MODULES:
        return None
    return module.split(".")[1]


def imports_against_wings(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in sorted(graph.items()):
        wing = wing_of(module)
        for target in sorted(targets):
            other = wing_of(target)
            if wing is None and other is not None:
                wrong.append(f"{module} -> {target} (a root module imports no wing)")
            elif wing is not None and other not in (None, wing) and other not in WINGS[wing]:
                wrong.append(f"{module} -> {target} ({wing} may import {sorted(WINGS[wing])})")
    return wrong


def test_every_module_sits_in_a_known_wing():
    unknown = {m for m in import_graph(PACKAGE) if wing_of(m) not in (None, *WINGS)}
    assert not unknown, f"modules outside the wing table: {sorted(unknown)}"


def test_imports_follow_the_wing_table():
    wrong = imports_against_wings(import_graph(PACKAGE))
    assert not wrong, "imports against the wing table:\n" + "\n".join(wrong)


def test_the_wing_check_finds_an_upward_import():
    graph = {"prefixlab.engine.train": {"prefixlab.runs.config", "prefixlab.errors"},
             "prefixlab.runs.config": {"prefixlab.engine.train"}, "prefixlab.errors": set()}
    assert imports_against_wings(graph) == [
        "prefixlab.engine.train -> prefixlab.runs.config (engine may import ['data'])"]


MAX_LINES = 600  # a module past this holds more than one concern: split it by what it does


def test_no_module_is_a_hall():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
