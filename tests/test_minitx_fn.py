"""The package as a whole (`minitx_fn/`): how its modules depend on each other and
what they may say, read from the source with `ast` (nothing imported, nothing run).

- No import circle: no module imports, at any depth, a module that imports it back
  (imports inside functions count; those under `if TYPE_CHECKING:` are never run).
- What differs between tokenizers is the tokenizer's own attribute: no module but
  `tokenizer.py` compares a tokenizer's `kind`.
- The library names fields; only `cli.py` names command-line flags (it renders the
  library's fields as flags through its one table, `cli.FLAGS`).
"""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minitx_fn")


def _modules() -> dict[str, str]:
    """{dotted name: path} of every module of the package."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(tree: ast.AST):
    """Every import statement that can run: those under `if TYPE_CHECKING:` cannot."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str) -> set[str]:
    """The package's modules that module `name` imports. `from pkg import sub` is an
    import of the submodule alone; `from pkg import name` (not a submodule) of pkg."""
    path = MODULES[name]
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in _imports(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
            continue
        if node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        subs = {f"{source}.{a.name}" for a in node.names} & MODULES.keys()
        found |= subs
        if len(subs) < len(node.names) and source in MODULES:
            found.add(source)
    return found - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm):
    each is a set of modules that import one another, directly or not.

    >>> cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}})
    [['a', 'b']]
    """
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = {name: imports_of(name) for name in MODULES}
    assert "minitx_fn.hf.folder" in graph["minitx_fn.cli"] or "minitx_fn.hf" in graph["minitx_fn.cli"]   # it reads
    found = cycles(graph)
    assert not found, "import circles: " + "; ".join(
        " ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found)


def _strings(path: str):
    """(line, text) of every string constant of a module that is not a docstring."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


# XLA's own flags, which testing.fast_compile sets in XLA_FLAGS: not a command line of ours.
XLA_FLAG = re.compile(r"^--xla_\w+=")


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "minitx_fn.cli"))
def test_no_library_message_names_a_command_line_flag(name):
    flags = [f"line {line}: {text[:80]!r}" for line, text in _strings(MODULES[name])
             if re.search(r"(?<![\w-])--[a-z]", text) and not XLA_FLAG.match(text)]
    assert not flags, f"{name} names flags (name the field; cli.FLAGS renders it): {flags}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != "minitx_fn.tokenizer"))
def test_no_module_but_the_tokenizers_asks_a_tokenizer_its_kind(name):
    tree = ast.parse(open(MODULES[name], encoding="utf-8").read())
    asked = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Compare)
             and any(isinstance(side, ast.Attribute) and side.attr == "kind"
                     and "tokenizer" in ast.unparse(side.value).lower() for side in [node.left, *node.comparators])]
    assert not asked, f"{name} asks a tokenizer its kind (give the tokenizer an attribute instead): {asked}"
