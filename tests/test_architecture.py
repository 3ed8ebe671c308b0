"""The package's shape, read from its source with ``ast`` (nothing of dfkd is imported): no import
cycle, no module importing one of a higher layer or a peer stage, no function-local import of a
dfkd module, no module over 300 lines, no ``_private`` name taken from another dfkd module.

``LAYERS`` is docs/architecture.md's table as data: a new module gets a row in both. Each check is a
function of plain data, and each is shown to fail on a small made-up package first."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dfkd"
MAX_LINES = 300

# layer -> (name, modules); a module imports modules of its own layer or lower ones, never higher
LAYERS = {
    0: ("foundation", {"errors", "version", "faults", "noise", "config", "run_config", "stats", "moments", "basis", "fastgrad", "taps",
                       "distributed",
                       "runtime", "losses", "views"}),
    1: ("files, data, networks", {"files", "data", "models", "graph", "images", "digits", "folders", "npz",
                                  "cifar", "pickles", "sources", "generators", "normstats"}),
    2: ("formats and mechanisms", {"checkpoint", "metadata", "forms", "records", "kinds", "resume", "synthetic", "privacy_report",
                                   "accountant", "privacy", "audit", "inference", "exporting", "quantization",
                                   "averaging"}),
    3: ("shared method", {"specs", "objective", "objectives", "normobjectives", "inversion", "loop", "recipes", "profiles"}),
    4: ("stages", {"training", "recording", "reconstruction", "distillation", "evaluation", "leakage",
                   "publishing", "generation", "deployment"}),
    5: ("pipeline", {"pipeline", "own", "colour", "budget", "results", "students", "shipping"}),
    6: ("command line", {"cli_fields", "cli_parser", "cli_commands", "cli", "__main__"}),
}
PEERS = 4  # the stages' layer: its modules import none of each other (the pipeline composes them)
FACADE = "__init__"  # the public API: above everything, imported by nothing inside the package


# --- reading the package -------------------------------------------------------------------------
def parse(root: Path = PACKAGE) -> dict[str, ast.Module]:
    """Module name (``errors``, ``__init__``) -> its syntax tree."""
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(root.glob("*.py"))}


def targets(node: ast.Import | ast.ImportFrom, modules: set[str], package: str = "dfkd") -> list[tuple[str, str]]:
    """``(module, name)`` for each dfkd module an import statement reaches, and the name it takes from it
    (``""`` for a whole module). ``from . import x`` takes the module ``x``; ``from .x import y`` the name
    ``y`` of ``x``; ``from . import __version__`` a name of the facade."""
    out = []
    if isinstance(node, ast.ImportFrom):
        if node.level == 0 and (node.module or "").split(".")[0] != package:
            return []
        mod = (node.module or "") if node.level else (node.module or "").partition(".")[2]
        for a in node.names:
            if not mod and a.name in modules:
                out.append((a.name, ""))
            else:
                out.append((mod or FACADE, a.name))
    else:
        for a in node.names:
            head, _, rest = a.name.partition(".")
            if head == package:
                out.append((rest.split(".")[0] if rest else FACADE, ""))
    return out


def dynamic(node: ast.AST, package: str = "dfkd") -> str | None:
    """The module a call ``__import__("dfkd.x")`` / ``importlib.import_module(".x", ...)`` names, as
    ``import dfkd.x`` would; None for any other node."""
    if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant):
        return None
    f, arg = node.func, node.args[0].value
    named = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
    if named not in ("__import__", "import_module") or not isinstance(arg, str):
        return None
    if arg.startswith("."):
        return f"{package}.{arg.lstrip('.')}" if arg.strip(".") else package
    return arg if arg.split(".")[0] == package else None


def import_nodes(tree: ast.AST):
    """Each import statement, and each dynamic import of a dfkd module as the ``import`` it stands for."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif (name := dynamic(node)) is not None:
            yield ast.copy_location(ast.Import(names=[ast.alias(name=name)]), node)


def imports(trees: dict[str, ast.Module]) -> list[tuple[str, str, str, ast.AST]]:
    """Every import of a dfkd module: ``(importer, imported, name, node)``, wherever it stands."""
    out = []
    for mod, tree in trees.items():
        for node in import_nodes(tree):
            out += [(mod, tgt, name, node) for tgt, name in targets(node, set(trees)) if tgt != mod]
    return out


def graph(edges) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for a, b, *_ in edges:
        g.setdefault(a, set()).add(b)
    return g


# --- the checks, each a function of plain data ---------------------------------------------------
def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``g`` (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(g.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(g):
        if v not in state and (found := visit(v)):
            return found
    return None


def layer_of(layers: dict[int, tuple[str, set[str]]]) -> dict[str, int]:
    return {m: k for k, (_, mods) in layers.items() for m in mods}


def layer_violations(g: dict[str, set[str]], layers: dict[int, tuple[str, set[str]]], peers: int,
                     facade: str = FACADE) -> list[str]:
    """Imports of a higher layer, of a peer in the ``peers`` layer, of the facade, or of a module the
    table does not place (the facade itself may import anything)."""
    where, out = layer_of(layers), []
    for a, bs in sorted(g.items()):
        for b in sorted(bs):
            if a == facade:
                continue
            if a not in where or b not in where:
                out.append(f"{a} -> {b}: not in the layer table")
            elif where[b] > where[a]:
                out.append(f"{a} (layer {where[a]}) -> {b} (layer {where[b]}): upward")
            elif where[a] == where[b] == peers:
                out.append(f"{a} -> {b}: stages are peers; move the shared part down")
    return out


def local_imports(tree: ast.Module, modules: set[str]) -> list[str]:
    """Imports of a dfkd module inside a function or class (optional extras are not dfkd modules)."""
    out = []
    for scope in ast.walk(tree):
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            for node in import_nodes(scope):
                if targets(node, modules):
                    out.append(f"line {node.lineno} in {getattr(scope, 'name', 'lambda')}")
    return sorted(set(out))


def defined(tree: ast.Module) -> set[str]:
    """The names a module defines: its functions, classes and assignments, and their members'."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
        elif isinstance(node, ast.arg):
            out.add(node.arg)
    return out


def private_uses(tree: ast.Module, modules: set[str], elsewhere: set[str] = frozenset()) -> list[str]:
    """``_private`` names taken from another dfkd module: imported (``from .x import _y``), reached
    through a module (``x._y`` after ``from . import x``, ``dfkd.x._y``), or reached on any object
    (``info._y``, ``Cls._y``) where ``_y`` is defined in another module (``elsewhere``) and not in this one."""
    out, own = [], defined(tree)
    for node in import_nodes(tree):
        for tgt, name in targets(node, modules):
            if name.startswith("_") and not name.startswith("__"):
                out.append(f"line {node.lineno}: {name} from {tgt}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in ("self", "cls"):
            continue
        through_module = isinstance(value, ast.Name) and value.id in modules and value.id not in own
        dotted = isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name) and value.value.id == "dfkd"
        if through_module or dotted or (node.attr in elsewhere and node.attr not in own):
            out.append(f"line {node.lineno}: {ast.unparse(value)}.{node.attr}")
    return out


def too_long(sizes: dict[str, int], limit: int = MAX_LINES) -> dict[str, int]:
    return {m: n for m, n in sizes.items() if n > limit}


# --- each check fails where it should --------------------------------------------------------------
MADE_UP = {0: ("low", {"a", "b"}), 1: ("stages", {"s", "t"}), 2: ("top", {"u"})}


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"u": {"s"}, "s": {"a", "b"}, "a": {"b"}}) is None
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_the_layer_check_finds_upward_peer_and_unplaced_imports():
    assert layer_violations({"u": {"s", "t", "a"}, "s": {"a", "b"}, "a": {"b"}}, MADE_UP, 1) == []
    found = layer_violations({"a": {"s"}, "s": {"t"}, "b": {"new"}}, MADE_UP, 1)
    assert found == ["a (layer 0) -> s (layer 1): upward", "b -> new: not in the layer table",
                     "s -> t: stages are peers; move the shared part down"]
    assert layer_violations({"a": {FACADE}}, MADE_UP, 1) == [f"a -> {FACADE}: not in the layer table"]


def test_the_local_import_check_finds_an_import_in_a_function():
    tree = ast.parse("import json\nfrom .a import x\n\ndef f():\n    import math\n    from . import b\n"
                     "    from .c import y\n    return x\n")
    assert local_imports(tree, {"a", "b", "c"}) == ["line 6 in f", "line 7 in f"]


def test_the_private_check_finds_imported_and_reached_private_names():
    tree = ast.parse("from . import a\nfrom .b import _hidden, shown\nfrom .a import __version__\n"
                     "a._inner(1)\na.outer()\nx._own = 1\nx._own + self._mine\n")
    assert private_uses(tree, {"a", "b"}) == ["line 2: _hidden from b", "line 4: a._inner"]
    # on an object of another module's class (the issue's ``DataInfo._chan``), and through ``dfkd.x``
    tree = ast.parse("import dfkd.data\nfrom .data import DataInfo\n\ndef f(info):\n"
                     "    return info._chan(1) + DataInfo._chan(2) + dfkd.data._x\n")
    assert sorted(private_uses(tree, {"data"}, elsewhere={"_chan"})) == \
        ["line 5: DataInfo._chan", "line 5: dfkd.data._x", "line 5: info._chan"]


def test_the_import_checks_see_dynamic_imports():
    tree = ast.parse("import importlib\n\ndef f():\n    importlib.import_module('dfkd.recording')\n"
                     "    __import__('.leakage')\n    __import__('json')\n")
    assert local_imports(tree, {"recording", "leakage"}) == ["line 4 in f", "line 5 in f"]
    assert [t for n in import_nodes(tree) for t in targets(n, {"recording", "leakage"})] == \
        [("recording", ""), ("leakage", "")]


def test_the_size_check_finds_a_long_module():
    assert too_long({"a": 300, "b": 301}) == {"b": 301}


# --- the package ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trees():
    return parse()


def test_every_module_has_a_layer(trees):
    placed = set(layer_of(LAYERS))
    assert set(trees) - {FACADE} == placed, "give each module a row in LAYERS and in docs/architecture.md"


def test_no_import_cycle(trees):
    assert find_cycle(graph(imports(trees))) is None


def test_no_import_of_a_higher_layer_or_a_peer_stage(trees):
    assert layer_violations(graph(imports(trees)), LAYERS, PEERS) == []


def test_no_function_local_import_of_a_dfkd_module(trees):
    found = {m: v for m, t in trees.items() if (v := local_imports(t, set(trees)))}
    assert found == {}


def test_no_module_over_300_lines():
    assert too_long({p.stem: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}) == {}


def test_no_private_name_from_another_module(trees):
    privates = {m: {n for n in defined(t) if n.startswith("_") and not n.startswith("__")} for m, t in trees.items()}
    found = {m: v for m, t in trees.items()
             if (v := private_uses(t, set(trees), set().union(*(privates[o] for o in trees if o != m))))}
    assert found == {}


def test_the_document_shows_the_same_layers():
    """docs/architecture.md's table names every module in the row of its layer."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    rows = {int(line.split("|")[1]): line for line in doc.splitlines() if line.startswith("| ") and
            line.split("|")[1].strip().isdigit()}
    assert set(rows) == set(LAYERS)
    for k, (_, mods) in LAYERS.items():
        named = {w.strip("`") for w in rows[k].split("|")[2].replace(",", " ").split()}
        assert named == mods, (k, named ^ mods)
