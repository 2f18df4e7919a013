"""The import graph follows the layers of DESIGN.md: no module imports one of a higher layer, and no two
modules import each other, directly or through others, counting imports inside functions ("lazy or not").

Layers, lowest first: the adapter file format and file helpers; guidance methods; pipelines (application of
guidance and adapters); erasure methods; evaluation and the attack; the toy world (and the test components built
on its tokenizer); interfaces (model loading, job runner, CLI, demo, the package's public API).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"unsee": "unsee", "guidance": "unsee.guidance", "pipelines": "unsee.pipelines",
           "erasure": "unsee.erasure", "apps": "unsee.apps"}

# module name (or package prefix ending in ".") -> layer; the longest matching entry wins
LAYERS = {
    "unsee.files": 0, "unsee.adapters": 0, "unsee.lora_formats": 0, "unsee.adapter_export": 0, "unsee.fuse": 0,
    "unsee.png_metadata": 1, "unsee.model_card": 0, "unsee.hub": 0, "unsee.suites": 0, "unsee.protocols": 0,
    "unsee.guidance.": 1,  # unsee.png_metadata too: its guidance keys come from unsee.guidance.registry
    "unsee.pipelines.": 2,
    "unsee.erasure.": 3,
    "unsee.evaluation": 4, "unsee.attack": 4, "unsee.convert": 4, "unsee.suite_eval": 4, "unsee.judges": 4,
    "unsee.toy.": 5, "unsee.testing": 5,
    "unsee.loading": 6, "unsee.jobs": 6, "unsee.cli": 6, "unsee.apps.": 6, "unsee": 6,
}
LAYER_NAMES = ["adapter format", "guidance", "pipelines", "erasure", "evaluation", "toy world", "interfaces"]


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT)
    parts = list(relative.with_suffix("").parts)
    parts[0] = FOLDERS[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    best, best_length = None, -1
    for key, layer in LAYERS.items():
        matches = module == key.rstrip(".") or (key.endswith(".") and module.startswith(key))
        if matches and len(key) > best_length:
            best, best_length = layer, len(key)
    assert best is not None, f"{module} is in no layer; add it to LAYERS"
    return best


def _resolve(module: str, path: Path, node: ast.AST) -> list[str]:
    """The unsee modules an import statement loads (a package's __init__ counts as the package)."""
    names = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        names = [base]
        names += [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
        if len(names) > 1:
            names = names[1:]  # "from pkg import submodule" loads the submodule (and pkg, counted separately below)
    targets = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            targets.append(name)
    return targets


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(t for t in _resolve(module, path, node) if t != module)
        graph[module] = edges
    return graph


GRAPH = _graph()


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer(module):
    mine = _layer(module)
    upward = sorted(t for t in GRAPH[module] if _layer(t) > mine)
    assert not upward, (f"{module} ({LAYER_NAMES[mine]}) imports {', '.join(upward)} "
                        f"({', '.join(LAYER_NAMES[_layer(t)] for t in upward)})")


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_core_never_imports_the_toy_world():
    toy = {m for m in MODULES if _layer(m) == LAYER_NAMES.index("toy world")}
    for module in MODULES:
        if module.startswith(("unsee.erasure", "unsee.guidance", "unsee.pipelines")) or module in (
                "unsee.adapters", "unsee.files", "unsee.evaluation", "unsee.attack", "unsee.suites", "unsee.suite_eval"):
            assert not GRAPH[module] & toy, f"{module} imports the toy world: {sorted(GRAPH[module] & toy)}"
