"""The package's imports run one way: no module imports, directly or through others, a module that imports it.

Every ``import``/``from ... import`` of a spinemri module counts, wherever it stands: a lazy import
inside a function that dodges a cycle at import time is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import spinemri

PACKAGE = Path(spinemri.__file__).parent


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the spinemri modules it imports}, from the source text of every module."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] == "spinemri":
                for alias in node.names:  # `from spinemri.data import limits` imports the module spinemri.data.limits
                    target = f"{node.module}.{alias.name}"
                    edges.add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split(".")[0] == "spinemri")
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle's members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40  # every module was read
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "spinemri"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from spinemri import high  # a lazy import\n")
    (package / "high.py").write_text("from spinemri.low import f\n")
    (package / "top.py").write_text("import spinemri.high\n")
    assert cycles(import_graph(package)) == [["spinemri.high", "spinemri.low"]]


# The floors of the package, lowest first: a module imports only from its own floor or those below it.
FLOORS = (
    ("spinemri.errors", "spinemri.redact", "spinemri.processes", "spinemri.atomic", "spinemri.figures", "spinemri.quiet"),
    ("spinemri.data",),  # DICOM and the datasets' layouts -> the sample table -> preprocessing -> cache
    ("spinemri.phantom",),  # the synthetic dataset, written in the RSNA layout the readers read
    ("spinemri.metrics",),  # pure: arrays and tables in, numbers out
    ("spinemri.models", "spinemri.localization"),  # the networks and what their outputs mean
    ("spinemri.config",),  # the settings, one dataclass per section
    ("spinemri.tracking",),  # MLflow: runs, reports, the registry policy
    ("spinemri.serving",),  # every served model and its requests
    ("spinemri.training",),  # fitting the classifier and the localizers
    ("spinemri.evaluation",),  # evaluation runs and comparisons of trained models
    ("spinemri.study",),  # the two-stage pipeline's products
    ("spinemri.api.tune", "spinemri.pacs"),
    ("spinemri.api",),  # the library run layer that the CLI, MLproject and tests call
    ("spinemri.cli", "spinemri.__main__"),
)


def floor_of(module: str) -> int | None:
    """The floor a module sits on (the package's own ``spinemri`` has none)."""
    found = None
    for level, packages in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in packages):
            found = level
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, t) for m, targets in graph.items() for t in targets
                  if floor_of(m) is not None and floor_of(t) is not None and floor_of(t) > floor_of(m))


def test_every_module_sits_on_a_floor():
    graph = import_graph()
    assert [m for m in graph if m != "spinemri" and floor_of(m) is None] == []


def test_no_import_runs_up_the_floors():
    found = upward_imports(import_graph())
    assert not found, "imports that run up the floors: " + "; ".join(f"{m} -> {t}" for m, t in found)


def test_the_floor_check_finds_an_upward_import(tmp_path):
    package = tmp_path / "spinemri"
    (package / "data").mkdir(parents=True)
    for path in (package / "__init__.py", package / "data" / "__init__.py", package / "config.py"):
        path.write_text("")
    (package / "data" / "source.py").write_text("def f():\n    from spinemri import config  # a lazy import\n")
    assert upward_imports(import_graph(package)) == [("spinemri.data.source", "spinemri.config")]


def test_no_module_is_over_500_lines_and_no_command_module_over_250():
    lengths = {path.relative_to(PACKAGE.parent).as_posix(): len(path.read_text().splitlines())
               for path in PACKAGE.rglob("*.py")}
    assert {p: n for p, n in lengths.items() if n > 500} == {}
    assert {p: n for p, n in lengths.items() if p.startswith("spinemri/cli/") and n >= 250} == {}


WHOLE_CONFIG_READERS = ("spinemri.api", "spinemri.cli", "spinemri.config")


def modules_naming(name: str, package: Path = PACKAGE) -> list[str]:
    """The modules that import ``name`` from a spinemri module (or refer to it as an attribute of one)."""
    found = []
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        if any(isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spinemri")
               and any(a.name == name for a in node.names) for node in ast.walk(tree)) \
                or any(isinstance(node, ast.Attribute) and node.attr == name for node in ast.walk(tree)):
            found.append(_module_name(path, package))
    return sorted(found)


def test_only_the_run_layer_and_the_cli_read_a_whole_experiment():
    readers = modules_naming("ExperimentConfig")
    assert "spinemri.api.classifier" in readers  # the check reads the tree
    below = [m for m in readers if not any(m == p or m.startswith(p + ".") for p in WHOLE_CONFIG_READERS)]
    assert below == [], "modules below the run layer that take the whole experiment config: " + ", ".join(below)


def test_the_config_check_finds_a_module_below_the_run_layer(tmp_path):
    package = tmp_path / "spinemri"
    (package / "training").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "training" / "fit.py").write_text("from spinemri.config import ExperimentConfig\n")
    assert modules_naming("ExperimentConfig", package) == ["spinemri.training.fit"]
