"""The package's imports run one way, floor by floor, and never in a circle.

Floors, lowest first (a module may import its own floor and the floors below it):

    core → lenses → analyses → plotting → reporting → cli

The test parses every module (nothing is imported), collects every import that runs (at module level
or inside a function; imports under ``if TYPE_CHECKING:`` never run and are left out) and fails on:

- a module that is on no floor (every module lives in one of the packages named in ``FLOORS``);
- an import that runs against the floors, unless it is in ``UPWARD``, the commented allow-list of
  lazy imports (a result's ``.plot()`` importing its figure inside the method);
- a circle of imports, the allowed upward ones included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "tl_logitlens"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# The floors, lowest first: each is a package of tl_logitlens, and a module's floor is its package's, so a
# new module gets its floor from the folder it is put in.
FLOORS: list[str] = ["core", "lenses", "analyses", "plotting", "reporting", "cli"]
# ``python -m tl_logitlens`` runs the command line: it stands on the top floor.
ON_TOP = ("tl_logitlens.__main__",)
# Off the floors: the package itself (it loads its public names lazily, by string, on first use; a
# module that reads a public name from it is resolved to the name's own module below), and the stubs of
# modules that moved (they forward by string too, see tl_logitlens.core.moved).
OFF_FLOORS = (
    "tl_logitlens",
    "tl_logitlens.tuned",
    "tl_logitlens.tuned_io",
    "tl_logitlens.tuned_train",
    "tl_logitlens.lens",
)

# Imports allowed to run upward. Each is lazy (inside the method that needs it), so importing the
# lower module never loads the higher one: a result's figure is drawn by plotting, which reads the
# result through tl_logitlens.core.results and never imports the analysis back.
UPWARD: set[tuple[str, str]] = {
    # LensResult.plot
    ("tl_logitlens.analyses.predictions", "tl_logitlens.plotting"),
    # DirectionResult.plot
    ("tl_logitlens.analyses.directions", "tl_logitlens.plotting"),
    # AttributionResult.plot, ComponentLensResult.plot
    ("tl_logitlens.analyses.attribution", "tl_logitlens.plotting"),
    # MaskedLensResult.plot_vocab, SlidingMaskResult.plot
    ("tl_logitlens.analyses.masked", "tl_logitlens.plotting.masked"),
    # DepthProfile.plot, .heatmap
    ("tl_logitlens.analyses.profile", "tl_logitlens.plotting.masked"),
    # LensComparison.plot
    ("tl_logitlens.analyses.lens_comparison", "tl_logitlens.plotting.lens_comparison"),
    # LensEvaluation.plot (and to_html, which draws through plot)
    ("tl_logitlens.analyses.evaluate", "tl_logitlens.plotting.evaluation"),
    # DecodedVector.plot, SteeringSweep.plot, Generation.plot, Faithfulness.plot (and to_html)
    ("tl_logitlens.analyses.decode", "tl_logitlens.plotting.interventions"),
    ("tl_logitlens.analyses.interventions", "tl_logitlens.plotting.interventions"),
    ("tl_logitlens.analyses.faithfulness", "tl_logitlens.plotting.interventions"),
    # Decomposition.plot, Occupancy.plot, JSpaceVariance.plot
    ("tl_logitlens.analyses.jspace", "tl_logitlens.plotting.jspace"),
    # CoordinatePatch.plot
    ("tl_logitlens.analyses.patching", "tl_logitlens.plotting.jspace"),
    # PatchscopeGeneration.plot
    ("tl_logitlens.analyses.patchscope", "tl_logitlens.plotting.patchscope"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def public_homes() -> dict[str, str]:
    """The package's lazily loaded public names and their modules (its ``_EXPORTS``), read from the source."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "_EXPORTS":
            return ast.literal_eval(node.value)
    raise AssertionError("tl_logitlens/__init__.py has no _EXPORTS mapping")


def _runtime_imports(tree: ast.AST) -> Iterator[tuple[ast.stmt, bool]]:
    """Each import statement that runs, and whether it runs lazily (inside a function)."""

    def visit(node: ast.AST, lazy: bool) -> Iterator[tuple[ast.stmt, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                yield from (item for stmt in child.orelse for item in visit_one(stmt, lazy))
                continue
            yield from visit_one(child, lazy)

    def visit_one(node: ast.AST, lazy: bool) -> Iterator[tuple[ast.stmt, bool]]:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            yield from visit(node, inner)

    yield from visit(tree, False)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def edges() -> dict[tuple[str, str], bool]:
    """``(importer, imported) -> lazy`` over the package's own modules (lazy only if every such import is)."""
    known = modules()
    homes = public_homes()
    out: dict[tuple[str, str], bool] = {}

    def add(src: str, dst: str, lazy: bool) -> None:
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = dst.split(".")
        for i in range(2, len(parts) + 1):
            target = ".".join(parts[:i])
            if target in known and target != src and not src.startswith(target + "."):
                out[(src, target)] = out.get((src, target), True) and lazy

    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node, lazy in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(PACKAGE):
                        add(name, alias.name, lazy)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if not base.startswith(PACKAGE):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    add(name, sub, lazy)
                elif base == PACKAGE and alias.name in homes:
                    add(name, homes[alias.name], lazy)  # a public name read through the package
                else:
                    add(name, base, lazy)
    return out


def floor_of(name: str) -> int | None:
    if name in ON_TOP:
        return len(FLOORS) - 1
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != PACKAGE or parts[1] not in FLOORS:
        return None
    return FLOORS.index(parts[1])


def test_every_module_is_on_a_floor():
    unplaced = [m for m in modules() if m not in OFF_FLOORS and floor_of(m) is None]
    assert not unplaced, f"modules on no floor: {unplaced}; put each in one of the packages {FLOORS}"


def test_imports_run_down_the_floors():
    wrong = []
    for (src, dst), lazy in sorted(edges().items()):
        if src in OFF_FLOORS or dst == PACKAGE:
            continue
        s, d = floor_of(src), floor_of(dst)
        if d is None or s is None or d <= s:
            continue
        # importing plotting.masked runs plotting/__init__ too: an allowed import allows its packages
        if any(src == u_src and (u_dst == dst or u_dst.startswith(dst + ".")) for u_src, u_dst in UPWARD):
            if not lazy:
                wrong.append(f"{src} -> {dst} is allowed only inside a method, but it runs at import")
            continue
        wrong.append(f"{src} ({FLOORS[s]}) imports {dst} ({FLOORS[d]})")
    assert not wrong, "imports against the floors:\n" + "\n".join(wrong)


def test_upward_allow_list_is_current():
    """Every allowed upward import still exists: the list says what the code does, nothing more."""
    stale = UPWARD - set(edges())
    assert not stale, f"UPWARD lists imports the code no longer makes: {sorted(stale)}"


def test_no_import_circles():
    graph: dict[str, set[str]] = {}
    for src, dst in edges():
        graph.setdefault(src, set()).add(dst)
    cycles = _cycles(graph)
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(
        ", ".join(c) for c in cycles
    )


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
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
            strongconnect(v)
    return found


@pytest.mark.parametrize(
    "graph, circle",
    [
        ({"a": {"b"}, "b": {"c"}}, False),
        ({"a": {"b"}, "b": {"a"}}, True),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, True),
    ],
    ids=["chain", "two-cycle", "three-cycle"],
)
def test_the_circle_finder_finds_circles(graph, circle):
    assert bool(_cycles(graph)) is circle


def test_the_parser_sees_lazy_and_type_checking_imports():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import tl_logitlens.a\n"
        "if TYPE_CHECKING:\n    import tl_logitlens.b\n"
        "def f():\n    import tl_logitlens.c\n"
    )
    seen = {node.names[0].name: lazy for node, lazy in _runtime_imports(tree) if isinstance(node, ast.Import)}
    assert seen == {"tl_logitlens.a": False, "tl_logitlens.c": True}


def test_the_top_level_holds_the_packages_and_nothing_else():
    """The floors are folders: beside them only the package's own files and the shims of moved modules."""
    shims = {name.rpartition(".")[2] + ".py" for name in OFF_FLOORS if name != PACKAGE}
    expected = {"__init__.py", "__main__.py", "py.typed", "demo_models", *FLOORS, *shims}
    present = {p.name for p in ROOT.iterdir() if p.name != "__pycache__"}
    assert present == expected, (
        f"unexpected at the top of {PACKAGE}/: {sorted(present - expected)}; missing: {sorted(expected - present)}"
    )


@pytest.mark.parametrize(
    "module, floor",
    [
        ("tl_logitlens.core.new_module", "core"),
        ("tl_logitlens.analyses.new_analysis", "analyses"),
        ("tl_logitlens.cli.new_command", "cli"),
        ("tl_logitlens.__main__", "cli"),
        ("tl_logitlens.new_top_level_module", None),
    ],
)
def test_a_module_gets_its_floor_from_its_folder(module, floor):
    found = floor_of(module)
    assert (FLOORS[found] if found is not None else None) == floor
