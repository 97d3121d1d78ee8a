"""The package's shape: imports point down the layers (.importlinter), tok1d has no import
cycles, and imports sit at the top of files (inline only for optional heavy dependencies).

Fast (no jax, no compile): it reads the source only.
"""

import ast
import os
import pathlib

import grimp
import pytest
from importlinter import configuration as importlinter_configuration
from importlinter.application import use_cases as importlinter

from conftest import REPO

PACKAGE = pathlib.Path(REPO) / "tok1d"

# Heavy dependencies that may be imported inside a function: optional, not installed by default
# (torch, safetensors, matplotlib, yaml, huggingface_hub), or slow to import and needed by one path only (sklearn:
# the demo's digits and classifier; tensorflow_datasets, ~0.6 s: the "tfds:" sources).
INLINE_ALLOWED = ("torch", "torchvision", "safetensors", "sklearn", "matplotlib", "yaml",
                  "tensorflow_datasets", "huggingface_hub")


def _modules_and_files():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), path


def test_import_contract_is_kept():
    """`lint-imports` on the repository's .importlinter: no module imports a layer above it
    and siblings (`|`) do not import each other."""
    importlinter_configuration.configure()
    kept = importlinter.lint_imports(config_filename=os.path.join(REPO, ".importlinter"),
                                     cache_dir=None, no_logo=True)
    assert kept, "lint-imports found broken contracts (run `lint-imports` to see them)"


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(
                        graph.find_modules_directly_imported_by(child) & modules))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_cycles_inside_tok1d():
    """Every module is its own strongly connected component of the import graph (imports
    inside functions count: they are how cycles hide)."""
    graph = grimp.build_graph("tok1d", cache_dir=None)
    cycles = _cycles(graph, set(graph.modules))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def _inline_imports(tree: ast.AST):
    """(line, module) of every import statement inside a function or class body."""
    found = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inside = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                  ast.ClassDef, ast.Lambda))
            if nested and isinstance(child, ast.Import):
                found.extend((child.lineno, a.name) for a in child.names)
            elif nested and isinstance(child, ast.ImportFrom):
                found.append((child.lineno, "." * child.level + (child.module or "")))
            visit(child, inside)

    visit(tree, False)
    return found


def test_imports_are_at_the_top_of_files():
    offenders = []
    for _, path in _modules_and_files():
        for line, module in _inline_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if module.split(".")[0] not in INLINE_ALLOWED:
                offenders.append(f"{path.relative_to(REPO)}:{line}: {module}")
    assert not offenders, (f"{len(offenders)} imports inside functions (move them to the top; "
                           f"inline only {INLINE_ALLOWED}):\n" + "\n".join(offenders))


@pytest.mark.parametrize("source, expected", [
    ("import os\ndef f():\n    import torch\n    from tok1d import x\n", [(3, "torch"), (4, "tok1d")]),
    ("class A:\n    def g(self):\n        from . import y\n", [(3, ".")]),
    ("import numpy\nif True:\n    import json\n", []),
])
def test_inline_import_scan(source, expected):
    assert _inline_imports(ast.parse(source)) == expected
