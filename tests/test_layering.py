"""One-way imports: every ``tyingrun.*`` import goes down the layers of docs/architecture.md.

Every module under tyingrun/ is parsed with ``ast`` (nothing is imported, so nothing runs); its ``tyingrun.*``
imports, those inside functions included and those under ``if TYPE_CHECKING:`` left out (they never run), are
checked against ALLOWED, the table of what each package or neutral module may import.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tyingrun"

# Low to high. A unit is a top-level module or a package (all its modules).
LAYERS: Dict[str, int] = {
    # 0: neutral - the facts everyone shares (errors, contracts, files, seeds, config, a run's status and summary,
    # how an override value is quoted)
    "tyingrun.errors": 0, "tyingrun.contracts": 0, "tyingrun.files": 0, "tyingrun.seeding": 0,
    "tyingrun.config": 0, "tyingrun.run_status": 0, "tyingrun.summary": 0, "tyingrun.overrides": 0, "tyingrun.hub": 0,
    # 1: the tying map and stack, the data, the report (neither data nor report knows models or training)
    "tyingrun.tying": 1, "tyingrun.data": 1, "tyingrun.report": 1,
    # 2: models, measurements, policies
    "tyingrun.models": 2, "tyingrun.metrics": 2, "tyingrun.policies": 2,
    # 3: the training loop, and the checks a config passes before anything is built
    "tyingrun.train": 3, "tyingrun.preflight": 3,
    # 4: one run, and the sweep callback
    "tyingrun.run": 4, "tyingrun.sweep": 4, "tyingrun.run_folder": 4,
    # 5: entry points
    "tyingrun.cli": 5, "tyingrun.export": 5, "tyingrun.ablations": 5, "tyingrun.data_cli": 5,
    "tyingrun.inspect_run": 5, "tyingrun.launch": 5,
}

NEUTRAL = frozenset(unit for unit, layer in LAYERS.items() if layer == 0)


def _units(*names: str) -> FrozenSet[str]:
    return frozenset(f"tyingrun.{name}" for name in names)


# What each unit may import besides itself. Every arrow points to a lower layer, except inside layer 0 and
# data_cli -> cli (the data tool composes the config as the Hydra app does and explains its errors the same way)
# and launch -> cli (the launcher reads its ranks' overrides as the Hydra app does).
ALLOWED: Dict[str, FrozenSet[str]] = {
    "tyingrun.errors": frozenset(),
    "tyingrun.contracts": frozenset(),
    "tyingrun.seeding": frozenset(),
    "tyingrun.summary": frozenset(),
    "tyingrun.config": _units("errors"),
    "tyingrun.files": frozenset(),
    "tyingrun.run_status": _units("files"),
    "tyingrun.overrides": frozenset(),
    "tyingrun.hub": _units("errors"),
    "tyingrun.tying": NEUTRAL,
    "tyingrun.data": NEUTRAL,
    "tyingrun.report": NEUTRAL,
    "tyingrun.models": NEUTRAL | _units("tying"),  # not metrics, not policies
    "tyingrun.metrics": NEUTRAL | _units("tying"),  # not models
    "tyingrun.policies": NEUTRAL | _units("tying"),  # not models, not metrics
    "tyingrun.train": NEUTRAL | _units("tying", "models", "metrics", "policies"),
    "tyingrun.preflight": NEUTRAL | _units("data", "models", "policies"),
    "tyingrun.run": NEUTRAL | _units("tying", "data", "models", "metrics", "policies", "train", "preflight"),
    "tyingrun.sweep": NEUTRAL,
    "tyingrun.run_folder": NEUTRAL,
    "tyingrun.cli": NEUTRAL | _units("report", "train", "run", "sweep", "run_folder"),
    "tyingrun.export": NEUTRAL | _units("models", "train", "run"),
    "tyingrun.inspect_run": NEUTRAL | _units("tying", "train", "run"),
    "tyingrun.ablations": NEUTRAL | _units("report", "cli", "data_cli"),
    "tyingrun.data_cli": NEUTRAL | _units("data", "preflight", "cli"),
    "tyingrun.launch": NEUTRAL | _units("train", "cli"),
}
# The arrows within one layer that ALLOWED grants on purpose.
SAME_LAYER = {("tyingrun.config", "tyingrun.errors"), ("tyingrun.run_status", "tyingrun.files"),
              ("tyingrun.hub", "tyingrun.errors"),
              ("tyingrun.data_cli", "tyingrun.cli"), ("tyingrun.ablations", "tyingrun.cli"),
              ("tyingrun.ablations", "tyingrun.data_cli"), ("tyingrun.launch", "tyingrun.cli")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The package or top-level module that ``module`` belongs to ("tyingrun" for the package itself)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node`` except the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _runtime_nodes(other)
            continue
        yield child
        yield from _runtime_nodes(child)


def imports_of(path: Path) -> List[Tuple[int, str]]:
    """(line, imported module) for each runtime ``tyingrun.*`` import of the file at ``path``."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source == "tyingrun":  # from tyingrun import config: the submodule is what is imported
                found += [(node.lineno, f"tyingrun.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, source))
    return [(line, name) for line, name in found if name == "tyingrun" or name.startswith("tyingrun.")]


def python_files() -> List[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    unknown = sorted({unit_of(module_name(path)) for path in python_files()} - set(LAYERS) - {"tyingrun"})
    assert not unknown, f"add these to LAYERS and ALLOWED in {Path(__file__).name}: {unknown}"
    assert set(ALLOWED) == set(LAYERS)


def test_the_table_points_down_and_has_no_cycle():
    upward = [(unit, dep) for unit, deps in ALLOWED.items() for dep in deps
              if LAYERS[dep] > LAYERS[unit] or (LAYERS[dep] == LAYERS[unit] and (unit, dep) not in SAME_LAYER)]
    assert not upward, f"ALLOWED points up or sideways: {upward}"
    done: set = set()

    def visit(unit: str, trail: Tuple[str, ...]) -> None:
        assert unit not in trail, f"ALLOWED has a cycle: {' -> '.join(trail + (unit,))}"
        if unit not in done:
            for dep in ALLOWED[unit]:
                visit(dep, trail + (unit,))
            done.add(unit)

    for unit in ALLOWED:
        visit(unit, ())


def test_imports_go_only_where_the_table_allows():
    offending = []
    for path in python_files():
        unit = unit_of(module_name(path))
        if unit == "tyingrun":
            continue
        for line, imported in imports_of(path):
            target = unit_of(imported)
            if target != unit and target not in ALLOWED[unit]:
                offending.append(f"{path.relative_to(ROOT)}:{line}: {unit} (layer {LAYERS[unit]}) imports "
                                 f"{imported} (layer {LAYERS.get(target, '?')})")
    assert not offending, "imports against the layering (tests/test_layering.py, docs/architecture.md):\n" + (
        "\n".join(offending))
