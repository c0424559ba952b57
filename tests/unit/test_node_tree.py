"""The node tree's walk (``NodePath._walk``) on hand-built graphs: what ``repr(pg.graph)``
draws and ``graphpatch-cache show --json`` lists, with ``depth`` and ``grep`` (no trace)."""

from __future__ import annotations

from graphpatch_cache.artifact import ModuleGraph, NodeData
from graphpatch_cache.runtime import NodePath


def _leaf_graph(name: str, path: str) -> ModuleGraph:
    nodes = [
        NodeData(name="x", op="placeholder", target="x", args={"t": []}, kwargs={"d": []},
                 meta={"shape": ["s0"], "dtype": "float32"}),
        NodeData(name="relu", op="call_function", target="torch.relu", args={"t": [{"n": "x"}]}, kwargs={"d": []},
                 meta={"shape": ["s0"], "dtype": "float32"}),
        NodeData(name="output", op="output", target="output", args={"t": [{"n": "relu"}]}, kwargs={"d": []},
                 meta={"shape": ["s0"], "dtype": "float32"}),
    ]
    return ModuleGraph(name=name, module_path=path, module_class="torch.nn.ReLU", kind="compiled", call_index=0,
                       nodes=nodes, children=[])


def _tree() -> NodePath:
    """A root with children ``h_1`` and ``h_10`` (one path a prefix of the other's)."""
    root = _leaf_graph("", "")
    children = [_leaf_graph("h_1", "h.1"), _leaf_graph("h_10", "h.10")]
    return NodePath.from_graph(ModuleGraph(name="", module_path="", module_class="Net", kind="compiled",
                                           call_index=0, nodes=root.nodes, children=children))


def test_walk_lists_every_path_once_depth_first():
    tree = _tree()
    walked = [str(n) for n, _, _ in tree._walk()]
    assert walked == ["x", "relu", "output", "h_1", "h_1.x", "h_1.relu", "h_1.output",
                      "h_10", "h_10.x", "h_10.relu", "h_10.output"]
    assert [(str(n), level) for n, level, _ in tree._walk(depth=1)] == [
        ("x", 0), ("relu", 0), ("output", 0), ("h_1", 0), ("h_10", 0)]


def test_grep_keeps_branches_holding_a_match_and_a_prefix_is_not_a_parent():
    tree = _tree()
    # "h_10.relu" contains "10.relu"; h_1 holds no such path although "h_10" starts with "h_1"
    assert [str(n) for n, _, _ in tree._walk(grep="10.relu")] == ["h_10", "h_10.relu"]
    assert tree._tree(grep="10.relu").splitlines() == ["<root>: Net", "└─h_10: ReLU", "   └─relu: Tensor(float32)[s0]"]


def test_the_drawing_is_the_walk():
    tree = _tree()
    drawn = tree._tree().splitlines()[1:]
    walked = list(tree._walk())
    assert len(drawn) == len(walked)
    for line, (node, level, last) in zip(drawn, walked):
        assert line[3 * level:].startswith(("└─" if last else "├─") + str(node).rpartition(".")[2])
