"""The node tree's walk (``NodePath._walk``) on hand-built graphs: what ``repr(pg.graph)``
draws and ``graphpatch-cache show --json`` lists, with ``depth`` and ``grep`` (no trace)."""

from __future__ import annotations

import torch

from graphpatch_cache.artifact import ModuleGraph, NodeData
from graphpatch_cache.runtime import NodePath, SymbolicShape


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
    assert tree._tree(grep="10.relu").splitlines() == [
        "<root>: Net", "sizes: s0 = x.shape[0]", "└─h_10: ReLU", "   └─relu: Tensor(float32)[s0]"]


def test_the_drawing_is_the_walk():
    tree = _tree()
    drawn = tree._tree().splitlines()[2:]  # (after the root and its sizes line)
    walked = list(tree._walk())
    assert len(drawn) == len(walked)
    for line, (node, level, last) in zip(drawn, walked):
        assert line[3 * level:].startswith(("└─" if last else "├─") + str(node).rpartition(".")[2])


# -- symbolic sizes by name ------------------------------------------------------------------------
def _value(name: str, shape, op: str = "call_function") -> NodeData:
    return NodeData(name=name, op=op, target=name if op == "placeholder" else "torch.relu",
                    args={"t": []}, kwargs={"d": []}, meta={"shape": shape, "dtype": "float32"})


def _decode_tree() -> NodePath:
    """A root graph with the inputs of a cached call, as dynamo names their sizes (no duck
    sizing: each input dim its own symbol, the cache's layers too)."""
    nodes = [
        _value("input_ids", ["s52", "s27"], "placeholder"),
        _value("attention_mask", ["s92", "s16"], "placeholder"),
        _value("cache_layer0_keys", ["s52", 2, "s53", 8], "placeholder"),
        _value("cache_layer0_values", ["s52", 2, "s40", 8], "placeholder"),
        _value("cache_layer1_keys", ["s52", 2, "s41", 8], "placeholder"),
        _value("hidden", ["s52", "s27", 32]),
        _value("keys", ["s52", 2, "s27 + s53", 8]),
        _value("values", ["s52", 2, "s27 + s40", 8]),
        _value("flat", ["s27*s52", 32]),
        _value("picked", ["u0", "s53 + 1"]),
    ]
    root = ModuleGraph(name="", module_path="", module_class="Net", kind="compiled", call_index=0, nodes=nodes,
                       children=[])
    return NodePath.from_graph(root)


def test_sizes_are_named_from_the_inputs_in_the_tree_and_explained_once():
    tree = _decode_tree()
    lines = tree._tree().splitlines()
    assert lines[0] == "<root>: Net"
    assert lines[1] == ("sizes: batch = input_ids.shape[0] (s52), seq = input_ids.shape[1] (s27), "
                        "s92 = attention_mask.shape[0], s16 = attention_mask.shape[1], "
                        "past = cache_layer0_keys.shape[2] (s53), past_v0 = cache_layer0_values.shape[2] (s40), "
                        "past_k1 = cache_layer1_keys.shape[2] (s41), u0: computed in the graph")
    drawn = "\n".join(lines)
    for line in ("├─input_ids: Tensor(float32)[batch, seq]", "├─attention_mask: Tensor(float32)[s92, s16]",
                 "├─cache_layer0_keys: Tensor(float32)[batch, 2, past, 8]", "├─hidden: Tensor(float32)[batch, seq, 32]",
                 "├─keys: Tensor(float32)[batch, 2, past + seq, 8]",  # dynamo wrote s27 + s53
                 "├─values: Tensor(float32)[batch, 2, past_v0 + seq, 8]",
                 "├─flat: Tensor(float32)[seq*batch, 32]", "└─picked: Tensor(float32)[u0, past + 1]"):
        assert line in drawn.splitlines(), line
    # a subtree explains the sizes it shows, and only those
    assert tree.hidden._tree().splitlines() == ["hidden: Tensor(float32)[batch, seq, 32]",
                                                "sizes: batch = input_ids.shape[0] (s52), seq = input_ids.shape[1] (s27)"]


def test_shapes_show_names_but_compare_and_substitute_as_symbols():
    tree = _decode_tree()
    keys = tree.keys._shape
    assert isinstance(keys, SymbolicShape)
    assert repr(keys) == str(keys) == "SymbolicShape([batch, 2, past + seq, 8])"
    assert repr(keys[0]) == "batch" and keys[0].name == "batch"
    # what the shape compares equal to is unchanged: the symbols' text
    assert keys[0] == "s52" and keys[2] == "s27 + s53" and tuple(keys) == ("s52", 2, "s27 + s53", 8)
    assert keys.names == {"s52": "batch", "s27": "seq", "s53": "past"}
    assert keys.sources == {"s52": "input_ids.shape[0]", "s27": "input_ids.shape[1]", "s53": "cache_layer0_keys.shape[2]"}
    want = torch.Size([3, 2, 11, 8])
    assert keys.subs({"s52": 3, "s27": 5, "s53": 6}) == keys.subs({"batch": 3, "seq": 5, "past": 6}) == want
    assert keys.subs({"batch": 3, "s27": 5, "past": 6}) == want
    assert repr(tree.attention_mask._shape) == "SymbolicShape([s92, s16])"  # no name: its symbol
