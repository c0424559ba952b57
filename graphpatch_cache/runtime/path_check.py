"""``pg.check_paths([...])``: node paths written against older code, checked against these graphs.

Each path is found *still there* (the same node at the same path), *renamed* (the node it
named is now at another path: matched by identity, as :func:`~.graph_diff.diff_graphs`
matches nodes) or *gone* (no node of these graphs is the one it named), with close matches.
Renames need the graphs the paths were written for (``since=``: an artifact, a
PatchableGraph, a key's variants or a portable file); without them a path is only found or
not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional

from ..errors import GraphPatchCacheError, close_matches
from .graph_diff import GraphsLike, artifacts_of, diff_trees
from .node_path import SUBPATH_SEP, NodePath

EXISTS, RENAMED, GONE = "exists", "renamed", "gone"


@dataclass(frozen=True)
class PathStatus:
    """One checked path: ``status`` is ``"exists"``, ``"renamed"`` (``new_path`` says to what)
    or ``"gone"`` (``suggestions``: close matches among these graphs' paths)."""

    path: str
    status: str
    new_path: Optional[str] = None
    suggestions: List[str] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class PathReport:
    """What :func:`check_paths` found, in the order the paths were given."""

    items: List[PathStatus]

    @property
    def exists(self) -> List[str]:
        return [i.path for i in self.items if i.status == EXISTS]

    @property
    def renamed(self) -> Dict[str, str]:
        """old path -> new path"""
        return {i.path: i.new_path for i in self.items if i.status == RENAMED and i.new_path is not None}

    @property
    def gone(self) -> Dict[str, List[str]]:
        """path -> close matches"""
        return {i.path: list(i.suggestions) for i in self.items if i.status == GONE}

    def __bool__(self) -> bool:
        """True when every path still exists as it was."""
        return all(i.status == EXISTS for i in self.items)

    def to_dict(self) -> Dict[str, Any]:
        return {"paths": [asdict(i) for i in self.items]}

    def __repr__(self) -> str:
        lines = []
        for i in self.items:
            text = f"{i.status:<8} {i.path}"
            if i.new_path is not None:
                text += f" -> {i.new_path}"
            if i.suggestions:
                text += f"  (close matches: {', '.join(i.suggestions)})"
            if i.note:
                text += f"  [{i.note}]"
            lines.append(text)
        return "\n".join(lines) or "(no paths)"


def _find(tree: NodePath, path: str) -> Optional[str]:
    """The node path ``path`` resolves to in ``tree`` (an alias resolved), or None."""
    try:
        return str(tree[path])
    except (GraphPatchCacheError, TypeError):
        return None


def check_paths(paths: Iterable[Any], graphs: GraphsLike, since: Optional[GraphsLike] = None) -> PathReport:
    """Check node paths from older code against ``graphs`` (see the module docstring).

    :param paths: node paths (``str`` or NodePath).
    :param graphs: the graphs now (a PatchableGraph, an artifact, ...).
    :param since: the graphs the paths were written for; needed to tell a rename.
    """
    paths = [str(p) for p in paths]
    if since is None:
        now = NodePath.from_graph(artifacts_of(graphs)[0].root)
        mapping: Dict[str, str] = {}
        old: Optional[NodePath] = None
    else:
        diff, old, now = diff_trees(since, graphs)
        mapping = diff.mapping
    candidates = [p for p in now._np_all_paths() if p]
    items = []
    for path in paths:
        here = _find(now, path)
        found = _find(old, path) if old is not None else None
        if found is None:  # no older graphs, or a path they do not have either: found or not
            if here is not None:
                items.append(PathStatus(path, EXISTS))
                continue
            note = "not a path of the older graphs either" if old is not None else \
                "pass since= (the graphs these paths were written for) to find renames"
            items.append(PathStatus(path, GONE, suggestions=close_matches(path, candidates), note=note))
            continue
        base, bar, rest = found.partition(SUBPATH_SEP)  # parts past the recorded structure map with their value
        new = mapping.get(found) or (mapping.get(base) and f"{mapping[base]}{bar}{rest}")
        if new is None:
            items.append(PathStatus(path, GONE, suggestions=close_matches(path, candidates)))
        elif new == here:
            items.append(PathStatus(path, EXISTS))
        else:
            note = f"{path} now names another node ({here})" if here is not None else ""
            items.append(PathStatus(path, RENAMED, new_path=new, note=note))
    return PathReport(items)


__all__ = ["PathReport", "PathStatus", "check_paths"]
