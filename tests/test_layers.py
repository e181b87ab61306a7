"""The house's rule, checked on the source: a module of ``adamix_ds`` imports only from its own layer or the
layers below it, and no modules import each other round in a circle. Every import counts, those under
``TYPE_CHECKING`` and inside functions too: a type the lower layer needs moves down to where both can see it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "adamix_ds"
# Bottom to top (the README's "Design"), by the module's or sub-package's name under adamix_ds.
LAYERS = {
    "method": (
        "__init__",
        "backbones",
        "checkpointing",
        "config",
        "consistency",
        "distributed",
        "flops",
        "gguf",
        "hub",
        "io",
        "kernels",
        "layer",
        "manifest",
        "merging",
        "model",
        "optim",
        "optim_deepspeed",
        "routing",
    ),
    "tasks": ("data", "evaluation", "families", "prompts"),
    "training": ("inference", "trainer", "training"),
    "tools": ("plan", "summary", "sweep"),
}
LEVEL = {room: level for level, rooms in enumerate(LAYERS.values()) for room in rooms}


def _module_name(path: Path) -> str:
    """``adamix_ds/training/data.py`` -> ``training.data``; a package is its ``__init__`` (``data``)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _room(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path) -> set[str]:
    """The ``adamix_ds`` modules ``path`` imports, wherever the import statement stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            # ``from adamix_ds.kernels import ops``: the submodule ops
            names.update(f"{node.module}.{alias.name}" for alias in node.names if _is_module(f"{node.module}.{alias.name}"))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    names = {name.removeprefix("adamix_ds.") for name in names if name.startswith("adamix_ds.")}
    return names - {_module_name(path)}  # a package importing its own submodule goes through itself


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        graph.add_node(module)
        graph.add_edges_from((module, imported) for imported in _imports(path))
    return graph


def test_every_module_has_a_layer_and_imports_point_down():
    graph = _graph()
    unplaced = sorted({_room(module) for module in graph} - LEVEL.keys())
    assert not unplaced, f"place these in LAYERS (the README's Design): {unplaced}"
    upward = [(a, b) for a, b in graph.edges if LEVEL[_room(b)] > LEVEL[_room(a)]]
    assert not upward, f"imports that point up: {upward}"
    assert graph.number_of_edges() > 50  # the walk saw the package's imports


def test_no_modules_import_each_other_round_in_a_circle():
    cycles = list(nx.simple_cycles(_graph()))
    assert not cycles, f"import cycles: {cycles}"


def test_inference_loads_without_deepspeed_or_the_training_code():
    """``adamix_ds.inference`` sits beside the training internals, not on them: loading an adapter imports neither
    DeepSpeed nor ``adamix_ds.training`` (checked in a fresh interpreter, where nothing else imported them)."""
    check = "import adamix_ds.inference, sys; print(sorted(m for m in ('deepspeed', 'adamix_ds.training') if m in sys.modules))"
    completed = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "[]"
