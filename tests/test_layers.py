"""The package's shape, held by tests: no import cycle, and layers that point down only
(design.md §9). Every ``import l2lab.x`` / ``from l2lab[.x] import y`` anywhere in a module,
function bodies included, is an edge: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: (the modules under this prefix, may not import anything under these prefixes, why)
RULES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("l2lab.core", ("l2lab.run", "l2lab.config", "l2lab.tracking", "l2lab.report",
                    "l2lab.compat"), "core/ is the science: it knows nothing above it"),
    ("l2lab.report", ("l2lab.tracking", "mlflow"), "the report takes plain records"),
    ("l2lab.tracking", ("l2lab.report",), "tracking does not build report types"),
)
#: The spec, the plain loop read first: an independent second implementation, so of the package
#: it may import the model classes only (the one thing both sides share); today it imports none,
#: building ``cfg.model`` through Hydra.
SPEC = "l2lab.core.reference"
SPEC_MAY_IMPORT = ("l2lab.models",)


def _modules() -> dict[str, Path]:
    found = {p.relative_to(SRC).with_suffix("").as_posix().replace("/", "."): p
             for p in (SRC / "l2lab").rglob("*.py")}
    return {m.removesuffix(".__init__"): p for m, p in found.items()}


def _imported(path: Path, modules: Iterable[str]) -> set[str]:
    """Every absolute module name ``path`` imports: ``from a import b`` is ``a.b`` where that is
    one of the package's ``modules`` (a submodule), else ``a`` (a name defined in ``a``)."""
    known, names = set(modules), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                      else node.module for a in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> every name it imports (the package's modules and third-party ones)."""
    modules = _modules()
    return {m: _imported(p, modules) for m, p in modules.items()}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    """One line per import that points up a layer, naming both ends and the rule."""
    found = []
    for mod, names in sorted(graph.items()):
        for scope, banned, why in RULES:
            if not _under(mod, scope):
                continue
            for name in sorted(names):
                if any(_under(name, b) for b in banned):
                    found.append(f"{mod} imports {name}: {why}")
        if mod == SPEC:
            for name in sorted(n for n in names if _under(n, "l2lab")):
                if not any(_under(name, p) for p in SPEC_MAY_IMPORT):
                    found.append(f"{mod} imports {name}: the spec stands alone")
    return found


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """The first import cycle among the package's modules, or None."""
    edges = {m: {n for n in names if n in graph and n != m} for m, names in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return [*path, m, n]
            if n not in state and (found := visit(n, [*path, m])):
                return found
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m, [])):
            return found
    return None


def _planted(graph: dict[str, set[str]], edges: Iterable[tuple[str, str]]):
    planted = {m: set(names) for m, names in graph.items()}
    for a, b in edges:
        planted[a].add(b)
    return planted


def test_no_import_cycle_counting_function_level_imports():
    graph = import_graph()
    assert "l2lab.run.engine" in graph["l2lab.train"]  # the walk saw real edges
    assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph) or [])}"


def test_layers_point_down_only():
    assert violations(import_graph()) == []


def test_the_layer_rules_catch_a_planted_upward_import():
    """The check is not vacuous: each kind of upward import, planted, is named."""
    graph = import_graph()
    planted = _planted(graph, [("l2lab.core.module", "l2lab.run.engine"),
                               ("l2lab.report.stats", "mlflow.tracking"),
                               ("l2lab.tracking.runs", "l2lab.report.stats"),
                               ("l2lab.core.reference", "l2lab.config.schema"),
                               ("l2lab.core.reference", "l2lab.core.data"),
                               ("l2lab.core.reference", "l2lab.core.regularization")])
    found = violations(planted)
    assert "l2lab.core.module imports l2lab.run.engine: core/ is the science: it knows " \
           "nothing above it" in found
    assert any(v.startswith("l2lab.report.stats imports mlflow.tracking") for v in found)
    assert any(v.startswith("l2lab.tracking.runs imports l2lab.report.stats") for v in found)
    for spec_import in ("l2lab.config.schema", "l2lab.core.data", "l2lab.core.regularization"):
        assert f"l2lab.core.reference imports {spec_import}: the spec stands alone" in found
    assert cycle(_planted(graph, [("l2lab.base", "l2lab.train")])) is not None
