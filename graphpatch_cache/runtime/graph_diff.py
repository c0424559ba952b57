"""What moved between two versions of a model's graphs: :func:`diff_graphs`.

Researchers pin node paths (``model.layers_5.mlp.act_fn.output``) in analysis code; an
upgrade of the model's code can rename or remove some silently. The diff matches the nodes
of two artifacts, top down:

1. **module graphs** by node path; then, for those left, by the module they are a call of
   (``module_path`` and call index: a call renamed); then by class among the unmatched
   children of matched parents, in order (an attribute renamed: ``self.mlp`` -> ``self.ffn``);
2. **values** inside each matched pair of graphs by identity, as patches are moved between
   variants (:mod:`.patch_stack`): op, target, the source line (without its file and line
   number, which any edit above it shifts) and the occurrence of that triple; inputs by
   their place in the signature, attributes by name, the output as the output. Values left
   over (a renamed local changes both the node's name and its source line) are aligned by
   op and target in graph order (:class:`difflib.SequenceMatcher`).

Matched nodes at other paths are *renamed*; unmatched ones are *added* or *removed* (a
whole module graph once, by its path); matched module graphs whose ops, children or class
differ have *changed structure*; matched values whose recorded shape or dtype differs have
*changed shape*. Shapes are compared with each size symbol written as the input dimension it
stands for (``input_ids.shape[1]``): two traces number their symbols independently.

Pure data in, pure data out: nothing is bound or run, so two cache entries (or a portable
file from another machine) are compared without a model.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Sequence, Tuple, Union

from ..artifact import GraphArtifact
from ..artifact.signature import signature_key
from .files import read_portable_file
from .node_html import split_source
from .node_path import NodePath
from .shapes import describe_meta

#: what :func:`diff_graphs` compares: an artifact, a PatchableGraph (its example's graphs),
#: the variants of one key or file, or a portable file's path (``pg.save``, ``export``)
GraphsLike = Union[GraphArtifact, Sequence[GraphArtifact], str, "os.PathLike[str]", Any]

_SYMBOL = re.compile(r"\b[A-Za-z_]\w*\b")
#: how alike two source lines must be (difflib's ratio) for their ops to be the same op
_SIMILAR = 0.6


@dataclass(frozen=True)
class ModuleChange:
    """A module graph present in both whose structure differs: ``path`` (in ``b``),
    ``old_path`` (in ``a``), classes, and the local names of the values and child graphs
    only one side has."""

    path: str
    old_path: str
    old_class: str
    new_class: str
    added: List[str] = field(default_factory=list)
    removed: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class ShapeChange:
    """A matched value whose recorded shape or dtype differs (``before``/``after`` as the
    text tree shows them, with size symbols written as input dimensions)."""

    path: str
    old_path: str
    before: str
    after: str


@dataclass(frozen=True)
class GraphDiff:
    """What :func:`diff_graphs` found. ``renamed`` pairs ``(old path, new path)``; a value
    whose graph was renamed is not listed again (``mapping`` has every matched path)."""

    a: str
    b: str
    added: List[str]
    removed: List[str]
    renamed: List[Tuple[str, str]]
    modules: List[ModuleChange]
    shapes: List[ShapeChange]
    #: every matched node path of ``a`` (graphs, values and their parts) -> its path in ``b``
    mapping: Dict[str, str] = field(repr=False, default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.renamed or self.modules or self.shapes)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: the fields less ``mapping``."""
        data = asdict(self)
        del data["mapping"]
        data["renamed"] = [{"old": o, "new": n} for o, n in self.renamed]
        return data

    def __str__(self) -> str:
        return format_diff(self)


def format_diff(diff: GraphDiff) -> str:
    """The diff as text (what ``graphpatch-cache diff`` prints)."""
    lines = [f"a: {diff.a}", f"b: {diff.b}"]
    if not diff:
        return "\n".join(lines + ["no differences in node paths, module structure or shapes"])
    if diff.renamed:
        lines.append(f"renamed ({len(diff.renamed)}):")
        lines += [f"  {old} -> {new}" for old, new in diff.renamed]
    reused = set(diff.removed) & set(diff.added)
    for title, paths in (("removed", diff.removed), ("added", diff.added)):
        if paths:
            lines.append(f"{title} ({len(paths)}):")
            lines += [f"  {p}" + ("  (the path now names another node)" if title == "added" and p in reused else "")
                      for p in paths]
    if diff.modules:
        lines.append(f"modules changed ({len(diff.modules)}):")
        for m in diff.modules:
            where = m.path if m.path == m.old_path else f"{m.old_path} -> {m.path}"
            old_cls, new_cls = m.old_class.rpartition(".")[2], m.new_class.rpartition(".")[2]
            cls = new_cls if m.new_class == m.old_class else f"{m.old_class} -> {m.new_class}"
            cls = f"{old_cls} -> {new_cls}" if old_cls != new_cls else cls
            parts = ([f"+{', +'.join(m.added)}"] if m.added else []) + ([f"-{', -'.join(m.removed)}"] if m.removed else [])
            lines.append(f"  {where or '<root>'} ({cls}): {'; '.join(parts) or 'class changed'}")
    if diff.shapes:
        lines.append(f"shapes changed ({len(diff.shapes)}):")
        lines += [f"  {s.path}: {s.before} -> {s.after}" for s in diff.shapes]
    return "\n".join(lines)


def artifacts_of(graphs: GraphsLike) -> List[GraphArtifact]:
    """The artifacts ``graphs`` stands for (see :data:`GraphsLike`).

    :raises TypeError: something else.
    :raises ArtifactFormatError, CacheMissError: a file that is not a portable file, or none.
    """
    if isinstance(graphs, GraphArtifact):
        return [graphs]
    if isinstance(graphs, (str, os.PathLike)):
        return read_portable_file(graphs)
    variants = getattr(graphs, "variants", None)  # a PatchableGraph: its variants, the example's first
    if isinstance(variants, list) and variants and all(isinstance(v, GraphArtifact) for v in variants):
        return list(variants)
    if isinstance(graphs, (list, tuple)) and graphs and all(isinstance(v, GraphArtifact) for v in graphs):
        return list(graphs)
    raise TypeError(f"diff_graphs compares GraphArtifacts, PatchableGraphs, lists of artifacts or portable files; "
                    f"got {type(graphs).__name__}")


def pick_pair(a: Sequence[GraphArtifact], b: Sequence[GraphArtifact]) -> Tuple[GraphArtifact, GraphArtifact]:
    """The variants to compare: the first of ``a`` whose call signature ``b`` also has, else
    the first of each."""
    keys_b = {signature_key(x.signature): x for x in b}
    for x in a:
        match = keys_b.get(signature_key(x.signature))
        if match is not None:
            return x, match
    return a[0], b[0]


def describe_artifact(artifact: GraphArtifact) -> str:
    """One line: the model's class, its call signature's input dims, the versions traced with."""
    dims = [leaf.get("dims", leaf.get("value")) for leaf in artifact.signature.get("leaves", [])]
    versions = ", ".join(f"{k} {artifact.versions[k]}" for k in ("torch", "transformers") if artifact.versions.get(k))
    return f"{artifact.model_class.rpartition('.')[2]} inputs {dims}" + (f" ({versions})" if versions else "")


def diff_graphs(a: GraphsLike, b: GraphsLike) -> GraphDiff:
    """Node paths added, removed and renamed between ``a`` (older) and ``b`` (newer), module
    graphs whose structure changed, and values whose shape changed (see the module
    docstring). Each side is a :class:`GraphArtifact`, a PatchableGraph, a list of a key's
    variants, or the path of a portable file; of several variants, the first call signature
    both sides have is compared.

    :raises TypeError: a side that is none of these.
    """
    return diff_trees(a, b)[0]


def diff_trees(a: GraphsLike, b: GraphsLike) -> Tuple[GraphDiff, NodePath, NodePath]:
    """:func:`diff_graphs`, with the node trees of the two artifacts it compared."""
    art_a, art_b = pick_pair(artifacts_of(a), artifacts_of(b))
    tree_a, tree_b = NodePath.from_graph(art_a.root), NodePath.from_graph(art_b.root)
    return _Differ(tree_a, tree_b).run(describe_artifact(art_a), describe_artifact(art_b)), tree_a, tree_b


def _graphs(root: NodePath) -> Dict[str, NodePath]:
    out: Dict[str, NodePath] = {"": root}
    for node, _level, _last in root._walk():
        if node._np_graph is not None:
            out[str(node)] = node
    return out


def _values(graph: NodePath) -> List[NodePath]:
    return [c for c in graph._np_children.values() if c._np_graph is None]


def _identity(value: NodePath, seen: Dict[Tuple[Any, ...], int]) -> Tuple[Any, ...]:
    nd = value._np_node
    assert nd is not None
    if nd.op in ("call_function", "call_method"):
        where, code = split_source(nd.meta.get("source", ""))
        base = (nd.op, nd.target, where.rpartition(" in ")[2] if where else "", code)
        k = seen.get(base, 0)
        seen[base] = k + 1
        return base + (k,)
    if nd.op == "placeholder":
        loc = nd.meta.get("input")
        return ("placeholder", repr(loc) if isinstance(loc, list) else nd.name)
    return (nd.op, nd.target)


def _coarse(value: NodePath) -> Tuple[str, str]:
    nd = value._np_node
    assert nd is not None
    return nd.op, nd.target


def _code(value: NodePath) -> str:
    """The source line of a value's op without its file and line number ("" if none)."""
    nd = value._np_node
    return split_source(nd.meta.get("source", ""))[1] if nd is not None and isinstance(nd.meta, dict) else ""


def shape_text(value: NodePath) -> str:
    """A value's recorded shape and dtype, each size symbol written as the input dimension it
    stands for (comparable between two traces)."""
    meta = value._np_meta
    text = describe_meta(meta) if isinstance(meta, dict) else ""
    sources = value._np_scope.sources if value._np_scope is not None else {}
    return _SYMBOL.sub(lambda m: f"{sources[m[0]][1]}.shape[{sources[m[0]][2]}]" if m[0] in sources else m[0], text)


class _Differ:
    def __init__(self, a: NodePath, b: NodePath) -> None:
        self.a, self.b = a, b
        self.ga, self.gb = _graphs(a), _graphs(b)
        self.pairs: Dict[str, str] = {}  # graph path in a -> in b
        self.mapping: Dict[str, str] = {}
        self.modules: List[ModuleChange] = []
        self.shapes: List[ShapeChange] = []

    def run(self, label_a: str, label_b: str) -> GraphDiff:
        self._match_graphs()
        for pa, pb in self.pairs.items():
            self._match_values(self.ga[pa], self.gb[pb])
        matched_b = set(self.mapping.values())
        removed = _topmost([p for p in self.a._np_all_paths() if p and p not in self.mapping and self._real(self.a, p)])
        added = _topmost([p for p in self.b._np_all_paths() if p and p not in matched_b and self._real(self.b, p)])
        renamed = []
        for old, new in self.mapping.items():
            if old == new or "|" in old:
                continue
            parent_a, _, name_a = old.rpartition(".")
            parent_b, _, name_b = new.rpartition(".")
            if name_a == name_b and self.pairs.get(parent_a) == parent_b and parent_a != parent_b:
                continue  # moved with its renamed graph: the graph's rename says it
            renamed.append((old, new))
        return GraphDiff(label_a, label_b, added, removed, renamed, self.modules, self.shapes, self.mapping)

    @staticmethod
    def _real(root: NodePath, path: str) -> bool:
        """A node's own path (not an input's alias, which the node's path stands for)."""
        return str(root._np_index[path]) == path

    def _match_graphs(self) -> None:
        for path in sorted(self.ga, key=lambda p: (p.count("."), p)):  # parents first
            if path in self.gb:
                self.pairs[path] = path
        by_call = {(g._np_graph.module_path, g._np_graph.call_index): p for p, g in self.gb.items() if g._np_graph}
        taken = set(self.pairs.values())
        for path, g in sorted(self.ga.items(), key=lambda kv: (kv[0].count("."), kv[0])):
            if path in self.pairs or g._np_graph is None:
                continue
            other = by_call.get((g._np_graph.module_path, g._np_graph.call_index))
            if other is not None and other not in taken:
                self.pairs[path] = other
                taken.add(other)
        for path in sorted(self.ga, key=lambda p: (p.count("."), p)):  # attributes renamed: by class, in order
            parent = self.pairs.get(path)
            if parent is None:
                continue
            left_a = [c for c in self.ga[path]._np_children.values() if c._np_graph is not None and str(c) not in self.pairs]
            left_b = [c for c in self.gb[parent]._np_children.values() if c._np_graph is not None and str(c) not in taken]
            for ca in left_a:
                cb = next((c for c in left_b if c._np_graph.module_class == ca._np_graph.module_class), None)  # type: ignore[union-attr]
                if cb is not None:
                    left_b.remove(cb)
                    self.pairs[str(ca)] = str(cb)
                    taken.add(str(cb))
        for pa, pb in self.pairs.items():
            self.mapping[pa] = pb

    def _match_values(self, ga: NodePath, gb: NodePath) -> None:
        va, vb = _values(ga), _values(gb)
        seen_a: Dict[Tuple[Any, ...], int] = {}
        seen_b: Dict[Tuple[Any, ...], int] = {}
        ids_b: Dict[Tuple[Any, ...], NodePath] = {}
        for v in vb:
            ids_b.setdefault(_identity(v, seen_b), v)
        pairs: Dict[int, NodePath] = {}
        used = set()
        for i, v in enumerate(va):
            match = ids_b.get(_identity(v, seen_a))
            if match is not None and id(match) not in used:
                pairs[i] = match
                used.add(id(match))
        # what identity left over (a renamed local changes the source line): the same op and
        # target on a similar line; then ops without a source line, aligned in graph order
        rest_a = [i for i in range(len(va)) if i not in pairs]
        rest_b = [v for v in vb if id(v) not in used]
        scored = []
        for i in rest_a:
            code_a = _code(va[i])
            for j, v in enumerate(rest_b):
                if code_a and _coarse(v) == _coarse(va[i]) and _code(v):
                    ratio = difflib.SequenceMatcher(None, code_a, _code(v), autojunk=False).ratio()
                    if ratio >= _SIMILAR:
                        scored.append((-ratio, abs(rest_a.index(i) - j), i, j))
        for _r, _d, i, j in sorted(scored):
            if i not in pairs and id(rest_b[j]) not in used:
                pairs[i] = rest_b[j]
                used.add(id(rest_b[j]))
        rest_a = [i for i in range(len(va)) if i not in pairs and not _code(va[i])]
        rest_b = [v for v in vb if id(v) not in used and not _code(v)]
        blocks = difflib.SequenceMatcher(None, [_coarse(va[i]) for i in rest_a], [_coarse(v) for v in rest_b],
                                         autojunk=False).get_matching_blocks()
        for block in blocks:
            for k in range(block.size):
                pairs[rest_a[block.a + k]] = rest_b[block.b + k]
                used.add(id(rest_b[block.b + k]))
        for i, match in pairs.items():
            self._pair_value(va[i], match)
        removed = [str(va[i]).rpartition(".")[2] for i in range(len(va)) if i not in pairs]
        added = [str(v).rpartition(".")[2] for v in vb if id(v) not in used]
        child_a = [c for c in ga._np_children.values() if c._np_graph is not None]
        child_b = [c for c in gb._np_children.values() if c._np_graph is not None]
        removed += [str(c).rpartition(".")[2] for c in child_a if str(c) not in self.pairs]
        paired_b = set(self.pairs.values())
        added += [str(c).rpartition(".")[2] for c in child_b if str(c) not in paired_b]
        cls_a, cls_b = ga._np_graph.module_class, gb._np_graph.module_class  # type: ignore[union-attr]
        if added or removed or cls_a != cls_b:
            self.modules.append(ModuleChange(str(gb), str(ga), cls_a, cls_b, added, removed))

    def _pair_value(self, va: NodePath, vb: NodePath) -> None:
        self.mapping[str(va)] = str(vb)
        before, after = shape_text(va), shape_text(vb)
        if before != after and not va._np_keys:
            self.shapes.append(ShapeChange(str(vb), str(va), before, after))
        for name, part in va._np_children.items():  # parts of a nested value, by the same key
            other = vb._np_children.get(name)
            if other is not None:
                self._pair_value(part, other)


def _topmost(paths: List[str]) -> List[str]:
    """``paths`` less those under another of them (a removed graph stands for its nodes)."""
    kept = set(paths)

    def under_another(p: str) -> bool:
        cut = [m.start() for m in re.finditer(r"[.|]", p)]
        return any(p[:i] in kept for i in cut)

    return sorted(p for p in paths if not under_another(p))


__all__ = ["GraphDiff", "GraphsLike", "ModuleChange", "ShapeChange", "artifacts_of", "diff_graphs", "diff_trees", "format_diff",
           "pick_pair", "shape_text"]
