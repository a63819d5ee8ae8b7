"""The package's import graph has no circle, and every module imports on its own.

Two checks:
- the graph read from the source (AST): an edge A -> B for every `import llmclf.B` / `from llmclf.B
  import ...` / `from llmclf import B` in A, module-level ones and, separately, those inside functions
  too (imports deferred to first use still make a circle: `families.py` opened GGUF files through
  `loaders/gguf.py`, which imports the registry). Not counted: imports under `if TYPE_CHECKING:` (never
  run), and a module's imports of its own parent packages (importing a submodule always initialises
  its parents first, so such an edge adds nothing; `llmclf.export.hf` reads `MAX_ABS_DIFF` from
  `llmclf.export`).
- a fresh interpreter imports each module with no other llmclf module loaded before it (one
  subprocess for all of them: it removes every llmclf module from `sys.modules` before each import).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "llmclf"


def module_names() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, module_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run: at module level (also inside try/if blocks), or anywhere."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(ast.Module(body=[other], type_ignores=[]))
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            elif not (module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
                visit(child)  # a class body, try/if/with blocks run at import time

    visit(tree)
    return found


def import_graph(module_level: bool) -> dict[str, set[str]]:
    """module -> the llmclf modules it imports (see the module docstring for what counts)."""
    modules = module_names()

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")), module_level):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                if target.split(".")[0] == "llmclf" and (found := owner(target)):
                    edges.add(found)
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = edges - ancestors - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_deferred_imports() -> None:
    tree = ast.parse("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import llmclf.cli\n"
                     "def f():\n    from llmclf.errors import ConfigError\nclass C:\n    import llmclf.config\n")
    top = [ast.unparse(n) for n in _imports(tree, module_level=True)]
    every = [ast.unparse(n) for n in _imports(tree, module_level=False)]
    assert top == ["import os", "from typing import TYPE_CHECKING", "import llmclf.config"]
    assert "from llmclf.errors import ConfigError" in every and "import llmclf.cli" not in every
    graph = import_graph(module_level=True)
    assert "llmclf.families" in graph["llmclf.loaders.spec"]  # a module-level edge is seen


@pytest.mark.parametrize("module_level", [True, False], ids=["module-level imports", "with imports in functions"])
def test_no_import_cycles(module_level: bool) -> None:
    assert cycles(import_graph(module_level)) == []


def test_each_module_imports_alone_in_a_fresh_interpreter() -> None:
    script = """
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "llmclf" or m.startswith("llmclf.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""
    names = sorted(n for n in module_names() if n != "llmclf.__main__")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    # two interpreters at once, every other module each: about half the wall time on two cores
    processes = [subprocess.Popen([sys.executable, "-c", script, json.dumps(names[i::2])], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=SRC.parent, env=env) for i in range(2)]
    failed = {}
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        failed.update(json.loads(stdout.strip().splitlines()[-1]))
    assert not failed, "\n".join(f"{name}:\n{tb}" for name, tb in failed.items())
