"""The package's shape: imports point one way (no circle anywhere in research/ or reports/), and the
loop, the metrics and the experiments read in one sitting (no function over 60 lines).

The import graph is read from the source with `ast`, so nothing is imported and the test is fast.
Every import statement counts, those inside functions too. Importing ``a.b.c`` also runs
``a/__init__`` and ``a/b/__init__``, so it is an edge to each of them as well — except to the
importer's own enclosing packages, which are already initialised (or initialising) before its body
runs. Relative imports are resolved against the importing module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60
# (sys.path entry, folders below it that hold modules): research is a package; reports/ holds scripts
# that import each other as top-level modules (`import sections`), the way `python reports/x.py` runs them.
SOURCES = [(ROOT, ["research"]), (ROOT / "reports", ["."])]
# The loop, the metrics and the experiments, wherever they live.
SHORT_FUNCTION_PLACES = ["research/training", "research/metrics", "research/experiments", "research/train.py",
                         "research/evaluation.py", "research/evaluate.py"]


# ─── the import graph ───────────────────────────────────────────────────────────────────────
def find_modules(entry: Path, folders: list[str]) -> dict[str, Path]:
    """{dotted name: file} of every module below entry/<folder>, named as `import` finds it from entry."""
    found = {}
    for folder in folders:
        base = (entry / folder).resolve()
        paths = base.rglob("*.py") if (base / "__init__.py").is_file() else base.glob("*.py")
        for path in paths:
            parts = path.relative_to(entry.resolve()).with_suffix("").parts
            if any(not (entry / Path(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
                continue  # a folder that is no package: not importable by this name
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_names(module: str, path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module name, names imported from it) of every import statement; [] for `import x.y`."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module
            out.append((base, [alias.name for alias in node.names]))
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of `modules` whose code runs because of its imports."""
    graph = {}
    for module, path in modules.items():
        own_packages = set(_prefixes(module)[:-1])
        edges = set()
        for base, names in imported_names(module, path):
            # `from pkg import sub` names the submodule; `from pkg import thing` reads pkg/__init__ itself
            explicit = {f"{base}.{n}" if f"{base}.{n}" in modules else base for n in names} or {base}
            for name in explicit:
                for target in _prefixes(name):
                    # an enclosing package is running already: only naming it explicitly is an edge
                    if target in modules and target != module and (target not in own_packages or target == name):
                        edges.add(target)
        graph[module] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module (each an import circle), sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
    return sorted(found)


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    """The circle's members and the edges between them, e.g. `a -> b, c`."""
    inside = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & inside))}" for m in component)


def circles(sources: list[tuple[Path, list[str]]], ignore: set[str] = frozenset()) -> list[str]:
    messages = []
    for entry, folders in sources:
        modules = {k: v for k, v in find_modules(entry, folders).items() if k not in ignore}
        graph = import_graph(modules)
        messages += [describe(c, graph) for c in strongly_connected(graph)]
    return messages


# ─── function length ────────────────────────────────────────────────────────────────────────
def long_functions(paths: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`file:line name (N lines)` for every function (nested ones too) longer than `limit` lines."""
    offenders = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return offenders


def short_function_files() -> list[Path]:
    files = []
    for place in SHORT_FUNCTION_PLACES:
        path = ROOT / place
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []
    return files


# ─── the tests ──────────────────────────────────────────────────────────────────────────────
def test_no_import_circle_in_research_or_reports():
    found = circles(SOURCES)
    assert not found, "import circles (module -> the members it imports):\n  " + "\n  ".join(found)


def test_the_checker_finds_a_circle_and_its_edges(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import c  # a package that imports its own module\n")
    (pkg / "a.py").write_text("def f():\n    from . import b  # inside a function, relative: still an edge\n")
    (pkg / "b.py").write_text("import pkg.a\n")
    (pkg / "sub" / "c.py").write_text("from ..d import x\nfrom pkg.sub.e import y\n")  # the own package: no edge
    (pkg / "sub" / "e.py").write_text("")
    (pkg / "d.py").write_text("import pkg.sub.e\n")  # runs pkg/sub/__init__, which imports c, which imports d
    graph = import_graph(find_modules(tmp_path, ["pkg"]))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.sub.c"] == {"pkg.d", "pkg.sub.e"}
    assert strongly_connected(graph) == [["pkg.a", "pkg.b"], ["pkg.d", "pkg.sub", "pkg.sub.c"]]
    assert circles([(tmp_path, ["pkg"])]) == ["pkg.a -> pkg.b; pkg.b -> pkg.a",
                                             "pkg.d -> pkg.sub; pkg.sub -> pkg.sub.c; pkg.sub.c -> pkg.d"]
    (pkg / "b.py").write_text("")
    (pkg / "d.py").write_text("x = 1\n")
    assert circles([(tmp_path, ["pkg"])]) == []


def test_scripts_folder_modules_import_each_other_by_bare_name(tmp_path):
    (tmp_path / "one.py").write_text("import two\n")
    (tmp_path / "two.py").write_text("from one import thing\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "three.py").write_text("import one\n")  # not a package: not a module of this folder
    assert set(find_modules(tmp_path, ["."])) == {"one", "two"}
    assert circles([(tmp_path, ["."])]) == ["one -> two; two -> one"]


def test_loop_metrics_and_experiments_have_no_function_over_60_lines():
    offenders = long_functions(short_function_files())
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines (split them into named phases):\n  " + \
        "\n  ".join(offenders)


def test_the_length_check_names_a_long_function(tmp_path):
    path = ROOT / "tests" / "test_layout.py"  # lives under ROOT, so its name can be printed relative to it
    assert long_functions([path], limit=10) and all("test_layout.py:" in o for o in long_functions([path], limit=10))
    assert long_functions([path], limit=10_000) == []


def test_every_module_imports_in_a_fresh_interpreter():
    """The graph above is read, not run: importing every module for real catches what it cannot see
    (a name that moved, an import that only fails at import time)."""
    import subprocess
    import sys

    names = sorted(find_modules(ROOT, ["research"]))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    done = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
