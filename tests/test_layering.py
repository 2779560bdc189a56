"""The package's structure: no import circles, imports only go down the floors, one folder per format.

Floors, lowest first: kernels < quant < nn < models < lora/optim/data/objectives < train, export, eval <
the command line. A module imports its own floor or a lower one, never a higher one; within a floor,
no module imports one that imports it back, directly or around a loop. Every import counts, also
the ones inside functions: a lazy import that closes a circle still makes two modules that cannot
be understood (or moved) apart. Read from the source with `ast`; nothing is imported.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (floor, module prefixes); a module takes the floor of its longest matching prefix.
FLOORS = [
    (0, ["qlora.errors", "qlora.staging", "qlora.options", "qlora.embedded", "qlora.recipes"]),
    (1, ["qlora.kernels"]),
    (2, ["qlora.quant"]),
    (3, ["qlora.nn"]),
    (4, ["qlora.models", "qlora.baseline", "qlora.memory", "qlora.hub"]),
    (5, ["qlora.lora", "qlora.lora_experts", "qlora.loftq", "qlora.optim", "qlora.data", "qlora.objectives"]),
    (6, ["qlora.train", "qlora.export", "qlora.evaluate", "qlora.distributed"]),
    (7, ["qlora.cli", "qlora.quantize_cli", "qlora.doctor", "qlora.demo", "qlora"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts = ["qlora", *parts]
    if parts[0] == "recipes":
        parts = ["qlora", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    files = [*(ROOT / "qlora").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"), *(ROOT / "recipes").rglob("*.py")]
    return {module_name(path): path for path in files}


def imports(path: Path, known: dict) -> set[str]:
    """The qlora modules `path` imports, anywhere in it. `from package import name` counts as an
    import of package.name when that is a module, else of the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("qlora"):
                found.add(name)
    return found


def floor(module: str) -> int:
    matches = [(len(prefix), level) for level, prefixes in FLOORS for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is on no floor: add it to FLOORS"
    return max(matches)[1]


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def circles(graph: dict) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_circles(graph):
    assert circles(graph) == []


def test_imports_go_down_the_floors(graph):
    upward = sorted(f"{module} (floor {floor(module)}) imports {other} (floor {floor(other)})"
                    for module, targets in graph.items() for other in targets
                    if floor(other) > floor(module) and not module.startswith(other + "."))
    assert upward == []


def test_the_circle_finder_finds_circles():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_each_format_is_a_folder():
    import qlora.quant

    formats = {"nf4", "int8", "gptq"}
    for folder in (ROOT / "qlora" / "quant", ROOT / "kernels"):
        assert formats <= {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}, folder
        flat = [p.name for p in folder.glob("*.py") if p.name.split("_")[0] in formats | {"int8", "gptq"}]
        assert flat == [], f"format files outside their folder in {folder}: {flat}"
    # The registry is what every layer, loader and exporter sees; each shipped format lives in a folder
    # (tests may register toy formats of their own).
    assert set(qlora.quant.registered_formats()) >= {"nf4", "fp4", "int8", "gptq"}
    for name in ("nf4", "fp4", "int8", "gptq"):
        module = qlora.quant.get_format(name).__module__
        assert module.split(".")[2] in formats, (name, module)
