"""The import graph follows the layers written in ARCHITECTURE.md.

Every module of ``graphpatch_cache/`` and ``cli/`` (installed as ``graphpatch_cache.cli``) is
parsed with :mod:`ast`; nothing is imported or executed, so this runs in well under a second.
:data:`LAYERS` below is the one table of layers; it mirrors ARCHITECTURE.md's "Layers"
section: change both together.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

ROOT = Path(__file__).resolve().parents[2]

#: ``(layer, units)``, bottom to top. A unit is a package or module name: a module belongs to
#: the unit that is its longest dotted prefix (``graphpatch_cache.trust.validate`` -> the unit
#: ``graphpatch_cache.trust``). ``graphpatch_cache`` itself (the package face, its
#: ``__init__.py``) matches exactly, never as a prefix. Imports inside one unit are free.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("ground", ("graphpatch_cache.errors", "graphpatch_cache._compat", "graphpatch_cache._files", "graphpatch_cache._lazy",
                "graphpatch_cache._version", "graphpatch_cache.progress")),
    ("data", ("graphpatch_cache.artifact", "graphpatch_cache.patches", "graphpatch_cache.options")),
    ("integrations", ("graphpatch_cache.integrations",)),
    ("live facts and trust", ("graphpatch_cache.live", "graphpatch_cache.trust")),
    ("extraction and runtime", ("graphpatch_cache.extraction", "graphpatch_cache.runtime")),
    ("composition", ("graphpatch_cache.compose",)),
    ("cache", ("graphpatch_cache.cache",)),
    ("faces", ("graphpatch_cache.compat", "graphpatch_cache")),
    ("command line", ("graphpatch_cache.cli", "graphpatch_cache.__main__")),
]

#: units matched exactly, never as a prefix of other modules
EXACT_UNITS = frozenset({"graphpatch_cache"})

#: same-layer imports that are allowed: unit -> the siblings it may import. Any other import
#: inside a layer is sideways (extraction <-> runtime above all: the artifact is their seam).
SIBLINGS: Dict[str, Set[str]] = {
    "graphpatch_cache._compat": {"graphpatch_cache.errors"},
    "graphpatch_cache._files": {"graphpatch_cache.errors"},
    "graphpatch_cache.artifact": set(),
    "graphpatch_cache.patches": set(),
    "graphpatch_cache.options": set(),
    "graphpatch_cache.compat": set(),
    "graphpatch_cache": {"graphpatch_cache.compat"},
    "graphpatch_cache.__main__": {"graphpatch_cache.cli"},
}

#: units whose imports are narrower than "anything below": unit -> the only units it may
#: import (besides itself). Optional integrations stand on the ground alone; the command line
#: uses the public library API (the package face and the public packages it re-exports from).
ONLY: Dict[str, Set[str]] = {
    "graphpatch_cache.integrations": {"graphpatch_cache.errors", "graphpatch_cache._compat"},
    "graphpatch_cache.cli": {"graphpatch_cache", "graphpatch_cache.errors", "graphpatch_cache.artifact",
                             "graphpatch_cache.cache"},
}

#: siblings that must never meet, named in the failure message
NEVER = {frozenset({"graphpatch_cache.extraction", "graphpatch_cache.runtime"}),
         frozenset({"graphpatch_cache.live", "graphpatch_cache.trust"})}

MAX_LINES = 400
PRIVATE_TORCH_HOME = "graphpatch_cache/_compat.py"
_JUSTIFIED = re.compile(r"\b(cycle|optional|deferred)\b", re.IGNORECASE)


@dataclass
class Edge:
    source: str  # importing module
    target: str  # imported module (internal)
    line: int
    end_line: int
    in_function: bool
    type_only: bool


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    text: str
    edges: List[Edge] = field(default_factory=list)

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "cli":  # installed as graphpatch_cache.cli (pyproject's package-dir mapping)
        parts = ["graphpatch_cache", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@lru_cache(maxsize=1)
def modules() -> Dict[str, Module]:
    out: Dict[str, Module] = {}
    for top in ("graphpatch_cache", "cli"):
        for path in sorted((ROOT / top).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            name = _module_name(path)
            out[name] = Module(name, path, path.name == "__init__.py", ast.parse(text, str(path)), text)
    for module in out.values():
        module.edges = list(_edges(module, out))
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _internal(name: Optional[str]) -> bool:
    return name is not None and (name == "graphpatch_cache" or name.startswith("graphpatch_cache."))


def _edges(module: Module, known: Dict[str, Module]):
    package = module.name if module.is_package else module.name.rpartition(".")[0]

    def resolve(base: Optional[str], level: int) -> Optional[str]:
        if level == 0:
            return base
        parts = package.split(".")
        if level - 1 > len(parts) - 1:
            return None
        anchor = ".".join(parts[: len(parts) - (level - 1)])
        return f"{anchor}.{base}" if base else anchor

    def longest_known(name: str) -> str:
        while name not in known and "." in name:
            name = name.rpartition(".")[0]
        return name

    def visit(node: ast.AST, in_function: bool, type_only: bool):
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from visit_stmt(stmt, fn, True)
                for stmt in child.orelse:
                    yield from visit_stmt(stmt, fn, type_only)
                continue
            yield from visit_stmt(child, fn, type_only)

    def visit_stmt(child: ast.AST, fn: bool, type_only: bool):
        end = getattr(child, "end_lineno", None) or getattr(child, "lineno", 0)
        if isinstance(child, ast.Import):
            for alias in child.names:
                if _internal(alias.name):
                    yield Edge(module.name, longest_known(alias.name), child.lineno, end, fn, type_only)
        elif isinstance(child, ast.ImportFrom):
            base = resolve(child.module, child.level)
            if _internal(base):
                assert base is not None
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in known else longest_known(base)
                    yield Edge(module.name, target, child.lineno, end, fn, type_only)
        fn_here = fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if not isinstance(child, (ast.Import, ast.ImportFrom)):
            yield from visit(child, fn_here, type_only)

    for stmt in module.tree.body:
        if isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
            for inner in stmt.body:
                yield from visit_stmt(inner, False, True)
            for inner in stmt.orelse:
                yield from visit_stmt(inner, False, False)
        else:
            yield from visit_stmt(stmt, False, False)


def unit_of(name: str) -> Optional[str]:
    best: Optional[str] = None
    for _, units in LAYERS:
        for unit in units:
            if name == unit or (unit not in EXACT_UNITS and name.startswith(unit + ".")):
                if best is None or len(unit) > len(best):
                    best = unit
    return best


def layer_of(unit: str) -> int:
    return next(i for i, (_, units) in enumerate(LAYERS) if unit in units)


def _report(problems: Sequence[str], title: str) -> None:
    assert not problems, f"{title} ({len(problems)}):\n  " + "\n  ".join(problems)


# -- the checks --------------------------------------------------------------------------------
def test_every_module_belongs_to_a_layer():
    problems = [f"{m.rel}:1: module {name} belongs to no layer; fix: add it (or its package) to LAYERS in "
                f"tests/unit/test_layers.py and to ARCHITECTURE.md's layer table, or move it into a package of a layer"
                for name, m in modules().items() if unit_of(name) is None]
    _report(problems, "modules outside every layer")


def test_imports_point_down_only():
    problems = []
    for name, m in modules().items():
        src = unit_of(name)
        if src is None:
            continue  # reported by test_every_module_belongs_to_a_layer
        seen: Set[Tuple[int, str]] = set()
        for e in m.edges:
            dst = unit_of(e.target)
            if dst is None or dst == src or (e.line, e.target) in seen:
                continue
            seen.add((e.line, e.target))
            where = f"{m.rel}:{e.line}: {name} imports {e.target}"
            s, d = layer_of(src), layer_of(dst)
            if src in ONLY and dst not in ONLY[src]:
                problems.append(f"{where}; {src} may import only {sorted(ONLY[src])}; fix: use what those offer "
                                "(add it there, or to the public API) instead")
            elif d > s:
                problems.append(f"{where}: upward ({LAYERS[s][0]} -> {LAYERS[d][0]}); fix: move the imported code "
                                f"down to {LAYERS[s][0]} or lower, or pass the value in from above")
            elif d == s and dst not in SIBLINGS.get(src, set()):
                never = frozenset({src, dst}) in NEVER
                problems.append(f"{where}: sideways within {LAYERS[s][0]!r}"
                                + ("; these two never import each other (the artifact is their seam)" if never else "")
                                + "; fix: move the shared code to a lower layer"
                                + ("" if never else ", or allow it in SIBLINGS and ARCHITECTURE.md"))
    _report(problems, "imports that break the layer order")


def _module_level_graph() -> Dict[str, Dict[str, Edge]]:
    graph: Dict[str, Dict[str, Edge]] = {}
    for name, m in modules().items():
        for e in m.edges:
            if not e.in_function and not e.type_only and e.target != name:
                graph.setdefault(name, {}).setdefault(e.target, e)
    return graph


def _strongly_connected(graph: Dict[str, Dict[str, Edge]]) -> List[List[str]]:
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]

    def connect(v: str) -> None:  # recursion depth is bounded by the number of modules (< 200)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                connect(w)
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

    for v in sorted(modules()):
        if v not in index:
            connect(v)
    return out


def _one_cycle(graph: Dict[str, Dict[str, Edge]], component: List[str]) -> List[str]:
    """A shortest cycle through the component's first module (breadth first)."""
    start, members = component[0], set(component)
    previous: Dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, {})):
            if w not in members:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
            if w not in previous:
                previous[w] = v
                queue.append(w)
    return component


def test_no_import_cycle():
    graph = _module_level_graph()
    problems = []
    for component in _strongly_connected(graph):
        cycle = _one_cycle(graph, component)
        steps = [f"{modules()[a].rel}:{graph[a][b].line} ({a} -> {b})" for a, b in zip(cycle, cycle[1:])]
        problems.append(f"{len(component)} modules import each other in a cycle; one of them: " + " -> ".join(cycle) + "\n    via "
                        + "\n    via ".join(steps) + "\n    fix: move the shared code down a layer so one of these "
                        "imports goes away (a function-level import with a 'cycle' comment only hides it)")
    _report(problems, "import cycles (module-level imports)")


def test_no_module_over_400_lines():
    problems = []
    for m in modules().values():
        n = m.text.count("\n") + (0 if m.text.endswith("\n") or not m.text else 1)
        if n > MAX_LINES:
            problems.append(f"{m.rel}:{MAX_LINES + 1}: {n} lines, more than {MAX_LINES}; fix: split it into modules "
                            "of one concept each")
    _report(problems, f"modules over {MAX_LINES} lines")


def _comments(text: str) -> Dict[int, str]:
    out: Dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string
    return out


def test_function_level_imports_say_why():
    problems = []
    for name, m in modules().items():
        comments: Optional[Dict[int, str]] = None
        seen: Set[Tuple[int, str]] = set()
        for e in m.edges:
            if not e.in_function or (e.line, e.target) in seen:
                continue
            seen.add((e.line, e.target))
            if comments is None:
                comments = _comments(m.text)
            lines = range(e.line - 1, e.end_line + 1)
            if not any(_JUSTIFIED.search(comments.get(i, "")) for i in lines):
                problems.append(f"{m.rel}:{e.line}: {name} imports {e.target} inside a function without saying why; "
                                "fix: import it at module level, or (only where it breaks a real cycle or defers an "
                                "optional dependency) say which in a comment on that line or the line above, with the "
                                "word 'cycle', 'optional' or 'deferred'")
    _report(problems, "unexplained function-level imports")


def _dotted(node: ast.AST) -> Optional[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _private_torch(name: str) -> bool:
    parts = name.split(".")
    if parts[0] != "torch":
        return "_pytree" in parts
    return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts[1:])


def test_private_torch_only_in_compat():
    problems = []
    for m in modules().values():
        if m.rel == PRIVATE_TORCH_HOME:
            continue
        found: Dict[int, Set[str]] = {}
        for node in ast.walk(m.tree):
            names: List[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute):
                names = [n for n in [_dotted(node)] if n]
            found.setdefault(getattr(node, "lineno", 0), set()).update(n for n in names if _private_torch(n))
        for line, names_here in sorted(found.items()):
            # the longest chain only (torch._C._foo, not also torch._C)
            for n in sorted(n for n in names_here if not any(o.startswith(n + ".") for o in names_here)):
                problems.append(f"{m.rel}:{line}: private torch name {n}; fix: add a small named wrapper to "
                                f"{PRIVATE_TORCH_HOME} (with a comment saying why) and call that")
    _report(problems, "private torch names outside _compat.py")


def test_the_table_matches_the_tree():
    """The table names no unit that does not exist (a stale entry after a rename)."""
    names = set(modules())
    problems = [f"tests/unit/test_layers.py: LAYERS names {unit}, which is no module or package; fix: remove or "
                "rename it here and in ARCHITECTURE.md"
                for _, units in LAYERS for unit in units
                if unit not in names and not any(n.startswith(unit + ".") for n in names)]
    _report(problems, "stale entries in the layer table")


def _documented_layers() -> List[Tuple[str, List[str]]]:
    """ARCHITECTURE.md's layer table: ``| 1. ground | `errors`, `_compat`, ... | ...``."""
    rows = []
    for line in (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\|\s*\d+\.\s*([^|]+?)\s*\|([^|]*)\|", line)
        if match:
            units = []
            for name in re.findall(r"`([^`]+)`", re.sub(r"\([^)]*\)", "", match.group(2))):  # (asides)
                name = name.split(" ")[0].rstrip("/")
                if name == "graphpatch_cache":
                    units.append(name)
                else:
                    units.append(f"graphpatch_cache.{name}")
            rows.append((match.group(1), units))
    return rows


def test_architecture_md_has_the_same_layers():
    documented = _documented_layers()
    problems = []
    if len(documented) != len(LAYERS):
        problems.append(f"ARCHITECTURE.md:1: its layer table has {len(documented)} layers, LAYERS {len(LAYERS)}; "
                        "fix: make the two tables the same")
    for (name, units), (doc_name, doc_units) in zip(LAYERS, documented):
        if sorted(units) != sorted(doc_units):
            problems.append(f"ARCHITECTURE.md: layer {doc_name!r} lists {sorted(doc_units)}, LAYERS' {name!r} "
                            f"{sorted(units)}; fix: make the two tables the same")
    _report(problems, "ARCHITECTURE.md and the layer table disagree")
