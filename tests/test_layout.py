"""The layout of the package (docs: DESIGN.md, "Layout"), checked from the source with ``ast``.

Every module of ``nd_plugin/``, ``adapters/`` (``nd_plugin.adapters``) and ``cli/``
(``nd_plugin.cli``) is parsed; its imports are every ``import`` / ``from ... import`` in it, at
module level or inside functions (those under ``if TYPE_CHECKING:`` are not run, so they do not
count). An import of ``a.b.c`` counts as an import of the longest of ``a.b.c``, ``a.b``, ``a``
that is one of our modules, and ``from a import b`` of ``a.b`` too when ``b`` is a module; a
module importing its own package's ``__init__`` is no circle (Python has run it already). The
project's import-cycle hook counts the same way.

The rules:

- no import circle among our modules;
- no module-level ``__getattr__`` (PEP 562): a moved name moves, its callers move with it; the one
  exception is the package's public face, ``nd_plugin/__init__.py``, which loads the names that
  pull in torch-pruning (which imports timm and torchvision), scikit-learn or matplotlib on first
  use, from each name's one home, so that ``import nd_plugin`` stays light;
- imports go downwards: no library module (anything but ``nd_plugin.commands`` and
  ``nd_plugin.cli``) imports the commands layer or the CLI;
- no module over 600 lines (split it when it holds two ideas);
- ``import nd_plugin`` imports neither timm nor torchvision.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"nd_plugin": "nd_plugin", "adapters": "nd_plugin.adapters", "cli": "nd_plugin.cli"}
FACADE = "nd_plugin"  # the package's public face: its lazy loader is the one module-level __getattr__
UPPER = ("nd_plugin.commands", "nd_plugin.cli")  # what the library below them may not import
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package."""
    found = {}
    for folder, dotted in FOLDERS.items():
        for file in sorted((ROOT / folder).rglob("*.py")):
            parts = file.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((dotted, *parts))] = file
    return found


MODULES = _modules()
TREES = {name: ast.parse(file.read_text(encoding="utf-8"), str(file)) for name, file in MODULES.items()}


def _owner(target: str) -> str | None:
    """The longest prefix of ``target`` that is one of our modules (None: not ours)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _imports(name: str) -> set[str]:
    """Our modules that module ``name`` imports (every import but those under ``if TYPE_CHECKING:``)."""
    tree = TREES[name]
    skipped = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for stmt in branch.body
        for node in ast.walk(stmt)
    }
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    targets: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    found = {_owner(t) for t in targets} - {None, name}
    return {t for t in found if not name.startswith(t + ".")}  # a package's own __init__ is no circle


GRAPH = {name: _imports(name) for name in MODULES}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_whole_package() -> None:
    """A guard for the checks below: they see lazy imports and every folder."""
    assert {"nd_plugin", "nd_plugin.run", "nd_plugin.commands.pruning", "nd_plugin.adapters", "nd_plugin.cli._app"} <= set(MODULES)
    assert "nd_plugin.commands.decoupling" in GRAPH["nd_plugin.cli._app"]  # imported inside a function
    assert "nd_plugin.run" in GRAPH["nd_plugin.training.trainer"]  # the Trainer's lazy import of the run format


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle() -> None:
    assert _circles(GRAPH) == []


def test_no_module_level_getattr_but_the_public_face() -> None:
    found = sorted(
        name for name, tree in TREES.items()
        if any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__" for node in tree.body)
    )
    assert found == [FACADE]


def test_the_public_face_loads_each_name_from_a_module_that_defines_it() -> None:
    """``nd_plugin._LAZY`` maps a name to its home; the home defines (or imports) it at top level."""
    tree = TREES[FACADE]
    table = next(
        node.value for node in tree.body
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
    )
    lazy = ast.literal_eval(table)
    for name, home in lazy.items():
        top = set()
        for node in TREES[home].body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                top.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                top |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                top |= {t.id for t in targets if isinstance(t, ast.Name)}
        assert name in top, f"nd_plugin.{name} is loaded from {home}, which does not define it"


def test_the_library_does_not_import_the_commands_layer_or_the_cli() -> None:
    def upper(name: str) -> bool:
        return any(name == u or name.startswith(u + ".") for u in UPPER)

    reaching_up = sorted(f"{name} imports {', '.join(sorted(filter(upper, GRAPH[name])))}"
                         for name in GRAPH if not upper(name) and any(map(upper, GRAPH[name])))
    assert reaching_up == []


def test_no_module_over_600_lines() -> None:
    sizes = {str(file.relative_to(ROOT)): len(file.read_text(encoding="utf-8").splitlines()) for file in MODULES.values()}
    assert {file: n for file, n in sizes.items() if n > MAX_LINES} == {}, "split these by idea"


def test_import_nd_plugin_imports_neither_timm_nor_torchvision() -> None:
    code = "import nd_plugin, sys; print('timm' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]
