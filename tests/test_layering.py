"""The package's import graph: no cycle (function-local imports included), nothing inside imports the package root."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_tgprune"


def _module_name(path: Path) -> str:
    parts = ["hf_tgprune", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body (a submodule import also runs its packages)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
                # `from package import name` reads the package itself unless every name is a submodule
                targets = submodules + ([base] if len(submodules) < len(node.names) else [])
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if target == "hf_tgprune":  # an explicit import of the package root
                    graph[name].add(target)
                while target.startswith("hf_tgprune."):  # a submodule runs its packages (the root excepted)
                    own_package = name.startswith(f"{target}.")  # loaded before this module anyway
                    if target in modules and target != name and not own_package:
                        graph[name].add(target)
                    target = target.rsplit(".", 1)[0]
    return graph


def longest_path(graph: dict[str, set[str]]) -> list[str]:
    memo: dict[str, list[str]] = {}

    def walk(node: str) -> list[str]:
        if node not in memo:
            memo[node] = [node] + max((walk(n) for n in graph[node]), key=len, default=[])
        return memo[node]

    return max((walk(n) for n in graph), key=len)


def test_no_module_imports_the_package_root():
    graph = import_graph()
    offenders = sorted(name for name, targets in graph.items() if "hf_tgprune" in targets and name != "hf_tgprune")
    assert offenders == []


def test_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle.extend(stack[stack.index(target) :] + [node, target] if target in stack else [node, target])
                return True
            if target not in state and visit(target, stack + [node]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if node not in state and visit(node, []):
            break
    assert cycle == [], " -> ".join(cycle)


# The folders are layers: a module imports only from its own layer or the layers before it.
LAYERS = ["core", "data", "io", "methods", "pruning", "training", "scripts"]


def _layer(module: str) -> int:
    parts = module.split(".")
    return len(LAYERS) if len(parts) == 1 else LAYERS.index(parts[1])  # the package root is above everything


def test_every_module_lives_in_a_layer_folder():
    assert sorted({name.split(".")[1] for name in import_graph() if "." in name}) == sorted(LAYERS)


def test_folders_import_only_from_the_layers_below():
    graph = import_graph()
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in graph.items()
        for target in targets
        if target != "hf_tgprune" and _layer(target) > _layer(name)
    )
    assert upward == []
