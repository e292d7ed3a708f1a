"""The package layering, read from the source: every import of every megatron module (inside functions too).

Layers, bottom up: megatron/data and megatron/parallel (no model code), megatron/model (no training code),
megatron/sizing, megatron/training, tools. A lower layer that imports an upper one drags the whole stack into
tools that need only the bottom, and makes import cycles easy; so the rules are checked here rather than
remembered. The imports that run at import time (module level, outside `if TYPE_CHECKING:`) must also form
no cycle: a cycle works or breaks by which module is imported first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron"

# importer prefix -> module prefixes it must not import (at all: module level or inside functions)
FORBIDDEN = {
    "megatron.data": ("megatron.model", "megatron.sizing", "megatron.training", "megatron.hf", "tools"),
    "megatron.parallel": ("megatron.model", "megatron.sizing", "megatron.training", "megatron.hf", "tools"),
    "megatron.model": ("megatron.training", "megatron.sizing", "tools"),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(path, package.parent): path for path in sorted(package.rglob("*.py"))}


def is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def module_level_nodes(tree: ast.Module) -> list[ast.AST]:
    """The nodes that run when the module is imported: not function bodies (class bodies do run), and not
    `if TYPE_CHECKING:` blocks, which only type checkers read."""
    nodes, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if is_type_checking_block(node):
            pending.extend(node.orelse)
            continue
        nodes.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return nodes


def imported_names(path: Path, name: str, module_level_only: bool) -> set[str]:
    """The absolute names each import statement of the file reaches (relative imports resolved against `name`).

    `from a.b import c` counts as a.b.c when that is a module and as a.b otherwise (c is an attribute)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in module_level_nodes(tree) if module_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
    return found


def resolved_imports(modules: dict[str, Path], name: str, module_level_only: bool) -> set[str]:
    """The file's imports with megatron names mapped to the module they load (an imported attribute maps to its
    module); other names (tools, torch, ...) as written."""
    resolved = set()
    for imported in imported_names(modules[name], name, module_level_only):
        if imported.split(".")[0] == "megatron":
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
        if imported and imported != name:
            resolved.add(imported)
    return resolved


def internal_edges(modules: dict[str, Path], module_level_only: bool) -> dict[str, set[str]]:
    """module -> the megatron modules it imports."""
    return {name: {target for target in resolved_imports(modules, name, module_level_only) if target in modules}
            for name in modules}


def layering_violations(modules: dict[str, Path]) -> list[str]:
    problems = []
    for name in modules:
        for importer, banned in FORBIDDEN.items():
            if name != importer and not name.startswith(importer + "."):
                continue
            for imported in sorted(resolved_imports(modules, name, module_level_only=False)):
                if any(imported == b or imported.startswith(b + ".") for b in banned):
                    problems.append(f"{name} imports {imported}")
    return problems


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(edges):
        if state.get(start):
            continue
        stack, path = [(start, iter(sorted(edges[start])))], [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(edges.get(child, ())))))
                path.append(child)
    return None


def test_lower_layers_import_nothing_above_them():
    assert layering_violations(all_modules()) == []


def test_no_import_cycle_among_megatron_modules():
    assert find_cycle(internal_edges(all_modules(), module_level_only=True)) is None


def write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return all_modules(root / "megatron")


@pytest.mark.parametrize("source, expected", [
    ("from megatron.model.gpt import GPT\n", ["megatron.parallel.mesh imports megatron.model.gpt"]),
    ("import tools.sweep\n", ["megatron.parallel.mesh imports tools.sweep"]),
    ("def f():\n    import megatron.training.trainer\n", ["megatron.parallel.mesh imports megatron.training.trainer"]),
    ("from ..model import gpt\n", ["megatron.parallel.mesh imports megatron.model",
                                   "megatron.parallel.mesh imports megatron.model.gpt"]),
    ("from megatron.data.tokenizer import vocab_size_of\n", []),
    ("from megatron.data import tokenizer\n", []),
])
def test_layering_check_sees_upward_imports(tmp_path, source, expected):
    modules = write(tmp_path, {"megatron/__init__.py": "", "megatron/parallel/__init__.py": "",
                               "megatron/parallel/mesh.py": source, "megatron/model/__init__.py": "",
                               "megatron/model/gpt.py": "", "megatron/data/__init__.py": "",
                               "megatron/data/tokenizer.py": "", "megatron/training/__init__.py": "",
                               "megatron/training/trainer.py": ""})
    assert layering_violations(modules) == expected


def test_cycle_check_sees_module_level_cycles_only(tmp_path):
    files = {"megatron/__init__.py": "", "megatron/a.py": "from megatron.b import thing\n",
             "megatron/b.py": "import megatron.c\n", "megatron/c.py": "def f():\n    import megatron.a\n"}
    assert find_cycle(internal_edges(write(tmp_path, files), module_level_only=True)) is None
    files["megatron/c.py"] = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import megatron.a\n"
    assert find_cycle(internal_edges(write(tmp_path, files), module_level_only=True)) is None
    files["megatron/c.py"] = "class C:\n    import megatron.a\n"
    assert find_cycle(internal_edges(write(tmp_path, files), module_level_only=True)) is not None
    files["megatron/c.py"] = "from megatron import a\n"
    cycle = find_cycle(internal_edges(write(tmp_path, files), module_level_only=True))
    assert cycle == ["megatron.a", "megatron.b", "megatron.c", "megatron.a"]
