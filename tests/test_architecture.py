"""The package's dependency rules, read from the source: no import cycles (imports inside functions count), and the
documented direction between the packages (docs/ARCHITECTURE.md)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the jetmoe modules it imports anywhere in its body (`from a import b` counts a.b if it is a
    module)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets.add(base)
                targets |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_cycles():
    graph = _imports()
    # A package's __init__ re-exporting its own submodules is not a cycle between modules.
    edges = {m: {t for t in ts if not (m == t.rpartition(".")[0] and _is_init(m))} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target] if target in stack else [node, target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def _is_init(module: str) -> bool:
    return (SRC / Path(*module.split(".")) / "__init__.py").is_file()


@pytest.mark.parametrize("package, forbidden", [
    ("jetmoe.kernels", {"jetmoe.model", "jetmoe.training", "jetmoe.data", "jetmoe.hf_io", "jetmoe.distributed"}),
    ("jetmoe.losses", {"jetmoe.model", "jetmoe.kernels", "jetmoe.training", "jetmoe.data"}),
    ("jetmoe.model", {"jetmoe.training", "jetmoe.data", "jetmoe.hf_io", "jetmoe.distributed", "jetmoe.cli",
                      "jetmoe.analysis"}),
    ("jetmoe.data", {"jetmoe.model", "jetmoe.kernels", "jetmoe.training", "jetmoe.hf_io", "jetmoe.distributed"}),
    ("jetmoe.config", {"jetmoe.model", "jetmoe.training", "jetmoe.data", "jetmoe.hf_io"}),
])
def test_dependency_direction(package, forbidden):
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in _imports().items() if module == package or module.startswith(package + ".")
        for target in targets if _package_of(target) in forbidden
    )
    assert not wrong, wrong


def test_model_package_imports_no_framework_beyond_torch():
    for path in (SRC / "jetmoe" / "model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in {"lightning", "omegaconf", "datasets", "tokenizers"}, (path, name)
