"""The package's shape, checked from its source with ``ast`` (nothing is imported):

* layers import downwards only: io -> data -> transforms -> networks -> localization -> metrics -> handlers ->
  engines -> experiments -> pacs -> cli (``constants`` below all, ``demo`` above all);
* no circle among the modules;
* no private name (``_x``) imported from another module;
* the package's own imports sit at module top, unless the line says why (a comment).

Each rule is also run against a small made-up package, so a check that cannot fail would show here.
"""

from __future__ import annotations

import ast
import os
import textwrap

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cutremain_monai")
LAYERS = ("io", "data", "transforms", "networks", "localization", "metrics", "handlers", "engines", "experiments",
          "pacs", "cli")


def module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def layer(module: str) -> int | None:
    """Rank of a module's layer (``constants`` -1, ``demo`` above ``cli``); None for the package itself."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return {"constants": -1, "demo": len(LAYERS)}.get(parts[1])


def package_imports(root: str) -> list[dict]:
    """Every import of the package's own modules: importer, imported module(s), names, line, whether it sits in a
    function, and whether its line carries a comment."""
    package = os.path.basename(root)
    out = []
    modules = set()
    files = []
    for folder, _, names in os.walk(root):
        for n in names:
            if n.endswith(".py"):
                path = os.path.join(folder, n)
                files.append(path)
                modules.add(module_name(root, path))
    for path in sorted(files):
        me = module_name(root, path)
        source = open(path, encoding="utf-8").read()
        lines = source.splitlines()
        tree = ast.parse(source)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = me.split(".")[: len(me.split(".")) - node.level + (1 if path.endswith("__init__.py") else 0)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if not (mod == package or mod.startswith(package + ".")):
                    continue
                names = [a.name for a in node.names]
                # `from pkg.sub import module` names a module: the edge goes to it
                targets = [f"{mod}.{n}" if f"{mod}.{n}" in modules else mod for n in names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name == package or a.name.startswith(package + ".")]
                names = []
                if not targets:
                    continue
            else:
                continue
            inner, n = False, node
            while n in parents:
                n = parents[n]
                inner = inner or isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            out.append({"module": me, "targets": sorted(set(targets)), "names": names, "line": node.lineno,
                        "inner": inner, "commented": "#" in text, "path": path})
    return out


def upward_imports(imports: list[dict]) -> list[str]:
    bad = []
    for imp in imports:
        mine = layer(imp["module"])
        for t in imp["targets"]:
            theirs = layer(t)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{imp['module']}:{imp['line']} imports {t} (a higher layer)")
    return bad


def private_imports(imports: list[dict]) -> list[str]:
    return [f"{imp['module']}:{imp['line']} imports {n} from {imp['targets'][0]}" for imp in imports
            for n in imp["names"] if n.startswith("_") and not n.startswith("__") and imp["targets"] != [imp["module"]]]


def silent_inner_imports(imports: list[dict]) -> list[str]:
    return [f"{imp['module']}:{imp['line']} imports {', '.join(imp['targets'])} inside a function without saying why"
            for imp in imports if imp["inner"] and not imp["commented"]]


def cycles(imports: list[dict]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle of imports."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        for t in imp["targets"]:
            if t != imp["module"] and not imp["module"].startswith(t + "."):  # a module's own package is no arrow
                graph.setdefault(imp["module"], set()).add(t)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def imports():
    return package_imports(PACKAGE)


def test_layers_import_downwards_only(imports):
    assert upward_imports(imports) == []


def test_no_circle_of_imports(imports):
    assert cycles(imports) == []


def test_no_private_name_imported_across_modules(imports):
    assert private_imports(imports) == []


def test_package_imports_sit_at_module_top_unless_the_line_says_why(imports):
    assert silent_inner_imports(imports) == []


def test_every_module_has_a_layer(imports):
    """A new top-level folder or module must be placed in the layer order (or the rules above skip it)."""
    modules = {imp["module"] for imp in imports} | {t for imp in imports for t in imp["targets"]}
    assert sorted(m for m in modules if "." in m and layer(m) is None) == []


def test_the_checks_find_what_they_look_for(tmp_path):
    """A made-up package with one of each fault: every check reports exactly it."""
    root = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "io/__init__.py": "",
        "io/reader.py": "from pkg.cli.other import run\n\ndef _helper():\n    pass\n",
        "data/__init__.py": "",
        "data/a.py": "from pkg.data.b import x\n",
        "data/b.py": "from pkg.io.reader import _helper\nfrom pkg.data.a import y\nx = 1\n",
        "cli/__init__.py": "",
        "cli/other.py": "def run():\n    pass\n",
        "cli/main.py": textwrap.dedent("""
            def run():
                from pkg.io import reader
                from pkg.data import a  # lazy: starts fast
            """),
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    found = package_imports(str(root))
    assert upward_imports(found) == ["pkg.io.reader:1 imports pkg.cli.other (a higher layer)"]
    assert private_imports(found) == ["pkg.data.b:1 imports _helper from pkg.io.reader"]
    assert silent_inner_imports(found) == ["pkg.cli.main:3 imports pkg.io.reader inside a function without saying why"]
    assert cycles(found) == [["pkg.data.a", "pkg.data.b"]]
