"""The house rule, read from the code: every `import` in the package (at module level or inside a
function) points to the importing module's own floor or a lower one, and no two modules import
each other, directly or round a longer circle.

The floors, top first (README, "Development"):
  cli → lab → bench → labkit (the package root: the public names) → entrypoints → engine →
  models → layers → distributed → kernels → observe → the foundation (config, sampling_params,
  structured_params, outputs, default_model, transfer, utils, version).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "labkit"

FLOORS = [
    ["labkit.cli"],
    ["labkit.lab"],
    ["labkit.bench"],
    ["labkit"],
    ["labkit.entrypoints"],
    ["labkit.engine"],
    ["labkit.models"],
    ["labkit.layers"],
    ["labkit.distributed"],
    ["labkit.kernels"],
    ["labkit.observe"],
    [
        "labkit.config",
        "labkit.sampling_params",
        "labkit.structured_params",
        "labkit.outputs",
        "labkit.default_model",
        "labkit.transfer",
        "labkit.utils",
        "labkit.version",
    ],
]


def floor_of(module: str) -> int:
    """The floor of the longest listed prefix of `module` (`labkit` alone is the root only)."""
    best, best_len = None, -1
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            inside = module == p or (p != "labkit" and module.startswith(p + "."))
            if inside and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} is on no floor: add it to FLOORS and the README's map"
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def labkit_imports(path: Path) -> set[str]:
    """The labkit modules `path` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "labkit"}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "labkit"
        ):
            # `from labkit.x import y` may name a submodule y: count it as labkit.x.y if so.
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if _is_module(sub) else node.module)
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_every_module_is_on_a_floor():
    for name in package_modules():
        floor_of(name)


def test_imports_point_down():
    upward = []
    for name, path in package_modules().items():
        for target in labkit_imports(path):
            if floor_of(target) < floor_of(name):
                upward.append(
                    f"{name} (floor {floor_of(name)}) imports {target} (floor {floor_of(target)})"
                )
    assert not upward, "imports that run back up:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    modules = package_modules()
    graph = {
        name: {t for t in labkit_imports(path) if t in modules and t != name}
        for name, path in modules.items()
    }
    # A package's __init__ importing its own submodules is how a package shows its public
    # names, not a circle: leave those edges out.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_rule_can_fail(tmp_path):
    """The reader finds imports inside functions too (a check that sees only the top of a file
    would pass a lazy upward import)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from labkit.lab import sweeps\n    import labkit.bench.common\n")
    assert labkit_imports(f) == {"labkit.lab.sweeps", "labkit.bench.common"}
    assert floor_of("labkit.lab.sweeps") < floor_of("labkit.engine.engine")


def test_every_package_says_what_lives_there_and_what_it_may_import():
    for init in sorted(PACKAGE.rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc, f"{init} has no docstring saying what lives there"
        if init.parent.parent == PACKAGE or init.parent == PACKAGE:  # the floors' packages
            assert "May import" in doc, f"{init}'s docstring does not say what it may import"
