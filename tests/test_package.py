"""The package's modules, read as source: data flows one way between them (no import cycle, and no relative import
hidden inside a function, which is how a cycle is usually papered over), every module imports alone in a folder of
its own (as a Hub folder's copy does, without the package's `__init__`), and the modeling file imports directly every
module a saved model needs (transformers 5.0 copies only those when it loads a local folder)."""

import ast
import importlib
import shutil
import sys
import warnings

import pytest

from helpers import ROOT

PACKAGE = ROOT / "modeling_poolformer"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))  # "__init__": the package itself


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def relative_imports(module: str) -> tuple[set, list]:
    """(the package modules `module` imports when it is imported, [(line, module) of relative imports inside
    functions]). Imports under `if TYPE_CHECKING:` never run and are left out."""
    at_import, in_functions = set(), []

    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.ImportFrom) and child.level == 1:
                # `from .x import y` names module x; `from . import x` module x, or the package for its names
                names = [child.module] if child.module else [
                    alias.name if (PACKAGE / f"{alias.name}.py").exists() else "__init__" for alias in child.names]
                for name in names:
                    (in_functions.append((child.lineno, name)) if in_function else at_import.add(name))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse((PACKAGE / f"{module}.py").read_text(), filename=f"{module}.py"), False)
    return at_import, in_functions


GRAPH = {module: relative_imports(module)[0] for module in MODULES}


def closure(module: str) -> set:
    """`module` and every package module importing it imports, directly or not."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(GRAPH[name])
    return seen


# what a Hub folder can hold: the modules that do not need the package's `__init__` (the checkpoint converter, a tool of
# the installed package, imports the package itself)
HUB_MODULES = [module for module in MODULES if "__init__" not in closure(module)]


def test_the_graph_names_only_modules_of_the_package():
    assert all(imports <= set(MODULES) for imports in GRAPH.values()), GRAPH


def test_no_import_cycle_among_the_modules():
    def cycle_from(module, path):
        if module in path:
            return path[path.index(module):] + [module]
        for name in sorted(GRAPH[module]):
            found = cycle_from(name, path + [module])
            if found:
                return found
        return None

    for module in MODULES:
        cycle = cycle_from(module, [])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    """The oracle above can fail: two modules that import each other are reported."""
    monkeypatch.setitem(GRAPH, "generation", GRAPH["generation"] | {"modeling_poolformer"})
    with pytest.raises(AssertionError, match="import cycle: .*generation.*modeling_poolformer"):
        test_no_import_cycle_among_the_modules()


def test_no_relative_import_inside_a_function():
    hidden = {module: relative_imports(module)[1] for module in MODULES}
    assert not any(hidden.values()), {module: lines for module, lines in hidden.items() if lines}


def test_every_module_imports_alone(tmp_path):
    """Each module is imported first, alone, from its own copy of the files (a folder with an empty `__init__`, as
    transformers lays out a Hub folder's code), and brings in no package module its imports do not name."""
    added = []
    sys.path.insert(0, str(tmp_path))
    try:
        for module in HUB_MODULES:
            folder = tmp_path / f"alone_{module}"
            shutil.copytree(PACKAGE, folder, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
            (folder / "__init__.py").write_text("")
            with warnings.catch_warnings():  # the version check warns on releases newer than the tested ones
                warnings.simplefilter("ignore")
                importlib.import_module(f"{folder.name}.{module}")
            loaded = {name.split(".", 1)[1] for name in sys.modules if name.startswith(f"{folder.name}.")}
            added += [name for name in sys.modules if name == folder.name or name.startswith(f"{folder.name}.")]
            assert module in loaded and loaded <= closure(module), (module, loaded - closure(module))
    finally:
        sys.path.remove(str(tmp_path))
        for name in added:
            sys.modules.pop(name, None)


def test_the_modeling_file_imports_every_module_a_saved_model_needs():
    needed = closure("modeling_poolformer") | closure("configuration_poolformer")
    assert "__init__" not in needed  # a Hub folder's `__init__` is empty
    copied = {"modeling_poolformer", "configuration_poolformer"} | GRAPH["modeling_poolformer"] | \
        GRAPH["configuration_poolformer"]
    assert needed <= copied, f"imported only indirectly, so missing from a loaded folder on transformers 5.0: " \
                             f"{sorted(needed - copied)}"
