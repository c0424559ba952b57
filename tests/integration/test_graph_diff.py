"""``diff_graphs``, ``pg.check_paths`` and ``graphpatch-cache diff`` on two real versions of a
model's code, and on one transformers architecture traced with eager and with sdpa attention.

Oracles: what the code edits are (``tests/helpers/model_v1.py`` -> ``model_v2.py``: a local
renamed, an op added, a module removed), the values the nodes hold (a renamed node must hold,
in the new graph, the very value the old path held in the old one: both models share their
weights; ``pg.record``), and the ops in the artifacts themselves (the eager graph's softmax
is gone, the sdpa call is new).
"""

from __future__ import annotations

import json

import pytest
import torch

import model_v1
import model_v2
from cli_run import invoke
from graphpatch_cache import CacheStore, GraphDiff, PatchableGraph, diff_graphs, load_cached
from graphpatch_cache.cache import node_tree
from tiny_models import tiny_llama, token_inputs

pytestmark = pytest.mark.slow  # the module's fixtures trace four small models


@pytest.fixture(scope="module")
def versions():
    torch.manual_seed(0)
    old = model_v1.Net().eval()
    new = model_v2.Net().eval()
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == ["norm.bias", "norm.weight"]
    x = torch.randn(2, 3, 4)
    return PatchableGraph(old, x), PatchableGraph(new, x), x


def test_the_diff_names_the_edits(versions):
    a, b, _x = versions
    diff = diff_graphs(a, b)
    assert diff.renamed == [("mlp.h", "mlp.hidden")]  # the local renamed: the relu's node is named after it
    assert diff.removed == ["norm"]  # the module removed, once (its nodes with it)
    assert diff.added == ["mlp.hidden_1", "mlp.sigmoid"]  # the gate: sigmoid, and its product
    assert [(m.path, m.added, m.removed) for m in diff.modules] == [
        ("", [], ["norm"]), ("mlp", ["sigmoid", "hidden_1"], [])]
    assert diff.shapes == []  # no value kept its path and changed its shape
    text = str(diff)
    assert "mlp.h -> mlp.hidden" in text and "removed (1):\n  norm" in text
    json.dumps(diff.to_dict())  # JSON-ready
    # nodes the edits did not touch keep their paths (the identity survives the line shifts)
    for path in ("mlp.mul", "mlp.up.linear", "mlp.down.linear", "add", "head.linear", "output"):
        assert diff.mapping[path] == path


def test_a_renamed_node_holds_the_value_its_old_path_held(versions):
    a, b, x = versions
    diff = diff_graphs(a, b)
    pairs = [(old, new) for old, new in diff.mapping.items() if old in ("mlp.h", "mlp.up.linear", "mlp.x")]
    assert len(pairs) == 3
    _, old_values = a.record(x, nodes=[old for old, _ in pairs])
    _, new_values = b.record(x, nodes=[new for _, new in pairs])
    for old, new in pairs:
        assert torch.equal(old_values[old], new_values[new]), (old, new)
    # and the new node named like the old one is another op: it holds another value
    _, gate = b.record(x, nodes=["mlp.hidden_1"])
    assert not torch.equal(gate["mlp.hidden_1"], old_values["mlp.h"])


def test_the_sides_may_be_artifacts_patchable_graphs_or_files(versions, tmp_path):
    a, b, _x = versions
    a.save(tmp_path / "old.json")
    expected = diff_graphs(a, b)
    for side_a in (a.artifact, [a.artifact], tmp_path / "old.json", str(tmp_path / "old.json")):
        assert diff_graphs(side_a, b.artifact) == expected
    same = diff_graphs(a, a)
    assert not same and isinstance(same, GraphDiff) and "no differences" in str(same)
    with pytest.raises(TypeError, match="GraphArtifacts, PatchableGraphs"):
        diff_graphs(a, 42)


def test_check_paths_with_and_without_the_older_graphs(versions):
    a, b, _x = versions
    paths = ["mlp.h", "mlp.up.linear", "mlp.up.input", "norm.layer_norm", "add", "output", "mlp.nothing"]
    report = b.check_paths(paths, since=a)
    assert report.renamed == {"mlp.h": "mlp.hidden"}
    assert report.exists == ["mlp.up.linear", "mlp.up.input", "add", "output"]  # an input's alias too
    assert sorted(report.gone) == ["mlp.nothing", "norm.layer_norm"]
    assert "mlp.h -> mlp.hidden" in repr(report) and not report
    assert b.check_paths(["mlp.up.linear", "head.output"], since=a)  # all still there: truthy
    # without the older graphs: found or not, with close matches
    plain = b.check_paths(["mlp.h", "mlp.up.linear"])
    assert plain.exists == ["mlp.up.linear"] and plain.renamed == {}
    assert plain.items[0].status == "gone" and "since=" in plain.items[0].note
    assert "mlp.x" in plain.gone["mlp.h"]  # a close match by spelling


@pytest.fixture(scope="module")
def attention_keys(tmp_path_factory):
    """One tiny Llama layer built with eager and with sdpa attention, in one store."""
    root = tmp_path_factory.mktemp("diff-store")
    store = CacheStore(root / "root", local_dir=root / "local")
    inputs = token_inputs()
    eager = load_cached(tiny_llama(attn="eager", n_layer=1), store=store, **inputs)
    sdpa = load_cached(tiny_llama(attn="sdpa", n_layer=1), store=store, **inputs)
    keys = {}
    for key in store.keys():
        (entry,) = store.variants(key)
        artifact = store.load_entry(entry)
        keys["eager" if artifact == eager.artifact else "sdpa"] = key
    assert sorted(keys) == ["eager", "sdpa"]
    return store, keys, eager, sdpa


def _targets(artifact, fragment):
    """(graph path, node name) of every node whose target contains ``fragment``."""
    tree = node_tree(artifact)
    return sorted(str(node) for node, _l, _last in tree._walk()
                  if node._np_node is not None and not node._np_keys and fragment in node._np_node.target)


def test_eager_against_sdpa_attention(attention_keys):
    _store, _keys, eager, sdpa = attention_keys
    diff = diff_graphs(eager, sdpa)
    softmax = _targets(eager.artifact, "softmax")
    sdpa_calls = _targets(sdpa.artifact, "scaled_dot_product_attention")
    assert softmax and sdpa_calls and not _targets(eager.artifact, "scaled_dot_product_attention")
    assert set(softmax) <= set(diff.removed) and set(sdpa_calls) <= set(diff.added)
    attn = [m for m in diff.modules if m.path == "model.layers_0.self_attn"]
    assert attn and "softmax" in attn[0].removed
    # the attention weights output is gone from the sdpa layer's output tuple
    changed = {s.path: s for s in diff.shapes}
    assert "model.layers_0.self_attn.output" in changed
    report = sdpa.check_paths(softmax + ["model.layers_0.mlp.act_fn.silu"], since=eager)
    assert sorted(report.gone) == softmax and report.exists == ["model.layers_0.mlp.act_fn.silu"]


def test_the_cli_diffs_two_entries_and_a_file(attention_keys, tmp_path):
    from click.testing import CliRunner

    store, keys, eager, sdpa = attention_keys
    runner = CliRunner()
    root = str(store.root)
    out = json.loads(invoke(runner, "diff", keys["eager"][:12], keys["sdpa"][:12], "--json", "--cache-dir", root).stdout)
    expected = diff_graphs(eager, sdpa).to_dict()
    assert out["a"] == {"target": keys["eager"][:12], "key": keys["eager"]}
    assert out["b"] == {"target": keys["sdpa"][:12], "key": keys["sdpa"]}
    assert out["compared"] == {"a": expected.pop("a"), "b": expected.pop("b")}
    assert {k: out[k] for k in expected} == json.loads(json.dumps(expected))
    text = invoke(runner, "diff", keys["eager"][:12], keys["sdpa"][:12], "--cache-dir", root).stdout
    assert text.rstrip("\n") == str(diff_graphs(eager, sdpa))
    # a portable file on one side (as `export` writes it)
    invoke(runner, "export", keys["eager"], "-o", tmp_path / "eager.json", "--cache-dir", root)
    from_file = json.loads(invoke(runner, "diff", tmp_path / "eager.json", keys["sdpa"], "--json",
                                  "--cache-dir", root).stdout)
    assert from_file["a"] == {"target": str(tmp_path / "eager.json"), "file": str(tmp_path / "eager.json")}
    assert from_file["removed"] == out["removed"] and from_file["renamed"] == out["renamed"]
    failed = invoke(runner, "diff", "0123abcd", keys["sdpa"], "--cache-dir", root, code=1)
    assert "0123abcd" in failed.stderr
