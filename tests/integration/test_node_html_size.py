"""The notebook view stays bounded on a deep model: 32 layers of a traced tiny GPT-2 block.

The tree is the session's one-layer tiny GPT-2 (``m1``: no trace of its own) with its traced
block ``transformer.h_0`` repeated as ``h_1`` ... ``h_31``, what a 32-layer model's tree holds
(tracing 32 layers costs tens of seconds on this machine). Oracles: the HTML's length per
node, the static rows (top level only), and in Chromium the rows the page really built."""

from __future__ import annotations

import dataclasses

import pytest

from chromium_page import ChromiumPage, chromium_binary, search_tree
from graphpatch_cache.runtime import NodePath
from graphpatch_cache.runtime.node_html import MAX_SEARCH_ROWS, tree_data

pytestmark = pytest.mark.slow  # the session's m1 fixture traces tiny GPT-2 once


@pytest.fixture(scope="module")
def deep(m1):
    root = m1[5].artifact.root
    (transformer,) = [g for g in root.children if g.name == "transformer"]
    (block,) = [g for g in transformer.children if g.name == "h_0"]
    blocks = [dataclasses.replace(block, name=f"h_{i}", module_path=f"transformer.h.{i}") for i in range(1, 32)]
    deep_transformer = dataclasses.replace(transformer, children=list(transformer.children) + blocks)
    deep_root = dataclasses.replace(root, children=[deep_transformer if g is transformer else g for g in root.children])
    return NodePath.from_graph(deep_root), NodePath.from_graph(root)


def test_the_html_of_32_layers_is_bounded(deep):
    tree, one = deep
    data, data_one = tree_data(tree), tree_data(one)
    per_block = len(data_one["nodes"]) - len([n for n in data_one["nodes"] if not n[0].startswith("transformer.h_0")])
    assert len(data["nodes"]) == len(data_one["nodes"]) + 31 * per_block and len(data["nodes"]) > 1500
    assert data["strings"] == data_one["strings"]  # labels and source lines once, however many layers
    page = tree._repr_html_()
    assert len(page) < 80 * len(data["nodes"]) + 20_000, len(page)  # about a path and a few indexes per node
    assert len(page) < len(repr(tree)) * 1.5  # the same order as the text tree
    assert page.count("<li>") == len(list(tree))  # the top level only


@pytest.mark.subprocess
@pytest.mark.skipif(chromium_binary() is None, reason="no chromium binary installed (apt-get install chromium)")
def test_the_page_builds_only_what_is_open_or_found(deep, tmp_path):
    tree, _one = deep
    page_file = tmp_path / "deep.html"
    page_file.write_text("<!doctype html><meta charset='utf-8'><body>" + tree._repr_html_() + "</body>", encoding="utf-8")
    count = "document.querySelectorAll('li').length"
    with ChromiumPage(page_file) as page:
        assert page.eval(count) == len(list(tree))
        search_tree(page, "h_17.mlp.act.mul_")
        hits = page.eval("[...document.querySelectorAll('li.gpc-hit')].map(e => e.getAttribute('data-path'))")
        assert hits == [p for p in tree._np_all_paths() if "h_17.mlp.act.mul_" in p]
        page.eval("(() => { const i = document.querySelector('input'); i.value = ''; "
                  "i.dispatchEvent(new Event('input')); })()")
        search_tree(page, ".")  # every path below the top level matches
        status = page.eval("document.querySelector('.gpc-status').textContent")
        assert status == f"first {MAX_SEARCH_ROWS} matching paths shown"
        assert MAX_SEARCH_ROWS <= page.eval(count) <= MAX_SEARCH_ROWS + 50  # the matches and their ancestors
        page.screenshot(tmp_path / "deep.png")
