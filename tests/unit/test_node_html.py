"""The notebook view of a node tree (``NodePath._repr_html_``, ``runtime/node_html.py``) on
hand-built graphs (no trace): hostile names and source lines stay text, the data blob reads
back exactly, the static part is the top level only, repeated strings are stored once.

Oracles: the standard library's HTML parser (which elements the fragment really has) and
``json`` (the blob as the page's script reads it); in Chromium, the page itself."""

from __future__ import annotations

import html.parser
import json
import re

import pytest

from chromium_page import ChromiumPage, chromium_binary, search_tree
from graphpatch_cache.artifact import ModuleGraph, NodeData
from graphpatch_cache.runtime import NodePath
from graphpatch_cache.runtime.node_html import node_tree_html, split_source, tree_data

EVIL_NAME = 'x<img src=x onerror="window.pwned=1">'
EVIL_SOURCE = 'File "m.py", line 3, in forward: y = x  # </script><script>window.pwned=2</script><!--'


def _layer(name: str, path: str, source: str = 'File "m.py", line 7, in forward: return torch.relu(x)') -> ModuleGraph:
    meta = {"shape": ["s0", 4], "dtype": "float32"}
    nodes = [
        NodeData(name="x", op="placeholder", target="x", args={"t": []}, kwargs={"d": []}, meta={**meta, "input": ["x"]}),
        NodeData(name="relu", op="call_function", target="torch.relu", args={"t": [{"n": "x"}]}, kwargs={"d": []},
                 meta={**meta, "source": source}),
        NodeData(name="output", op="output", target="output", args={"t": [{"n": "relu"}]}, kwargs={"d": []}, meta=meta),
    ]
    return ModuleGraph(name=name, module_path=path, module_class="torch.nn.ReLU", kind="compiled", call_index=0,
                       nodes=nodes, children=[])


def _evil_tree() -> NodePath:
    meta = {"shape": ["s0", 4], "dtype": "float32"}
    nodes = [
        NodeData(name="x", op="placeholder", target="x", args={"t": []}, kwargs={"d": []}, meta={**meta, "input": ["x"]}),
        NodeData(name=EVIL_NAME, op="call_function", target="torch.relu", args={"t": [{"n": "x"}]}, kwargs={"d": []},
                 meta={**meta, "source": EVIL_SOURCE}),
        NodeData(name="output", op="output", target="output", args={"t": [{"n": EVIL_NAME}]}, kwargs={"d": []},
                 meta=meta),
    ]
    root = ModuleGraph(name="", module_path="", module_class="evil.Net<b>", kind="compiled", call_index=0,
                       nodes=nodes, children=[_layer("h_0", "h.0", EVIL_SOURCE)])
    return NodePath.from_graph(root)


class _Elements(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags, self.scripts, self.text, self._in_script = [], [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "script":
            self._in_script = True
            self.scripts.append([dict(attrs), ""])

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1][1] += data
        else:
            self.text.append(data)


def test_hostile_names_and_source_lines_stay_text():
    tree = _evil_tree()
    page = tree._repr_html_()
    parsed = _Elements()
    parsed.feed(page)
    parsed.close()
    assert set(parsed.tags) == {"div", "style", "strong", "input", "span", "ul", "li", "script"}  # no <img>, no more
    assert [attrs.get("type") for attrs, _ in parsed.scripts] == ["application/json", None]
    blob = json.loads(parsed.scripts[0][1])
    assert blob == json.loads(json.dumps(tree_data(tree)))  # escaped for the page, the same data
    assert [n[0] for n in blob["nodes"]][:2] == ["x", EVIL_NAME]
    assert "window.pwned" not in parsed.scripts[1][1]  # the page's own script holds none of the data
    text = "".join(parsed.text)
    assert EVIL_NAME in text and "evil.Net<b>" not in text and "Net<b>" in text  # shown as text, escaped
    assert "</script><script>" in text  # the source line, as text
    assert page.count("<script") == 2 and "<img" not in page


def test_plain_repr_is_unchanged_and_values_render_too():
    tree = _evil_tree()
    assert repr(tree) == tree._tree()
    assert str(tree.h_0.relu) == "h_0.relu"  # children still reachable by attribute
    value = tree["h_0.relu"]
    assert "relu" in value._repr_html_()
    assert split_source(EVIL_SOURCE) == ("m.py:3 in forward", EVIL_SOURCE.split("forward: ", 1)[1])
    assert split_source("no location") == ("", "no location") and split_source(None) == ("", "")


def test_the_static_part_is_the_top_level_and_strings_repeat_once():
    layers = [_layer(f"h_{i}", f"h.{i}") for i in range(32)]
    one = NodePath.from_graph(ModuleGraph(name="", module_path="", module_class="Net", kind="compiled",
                                          call_index=0, nodes=_layer("", "").nodes, children=layers[:1]))
    many = NodePath.from_graph(ModuleGraph(name="", module_path="", module_class="Net", kind="compiled",
                                           call_index=0, nodes=_layer("", "").nodes, children=layers))
    small, big = tree_data(one), tree_data(many)
    assert big["strings"] == small["strings"]  # labels and source lines stored once, whatever the depth
    assert len(big["nodes"]) == 3 + 32 * 4
    page = node_tree_html(many)
    assert page.count("<li>") == 3 + 32  # the top level only: deeper rows are built when opened
    assert all(f'"h_{i}.relu"' in page for i in range(32))


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(chromium_binary() is None, reason="no chromium binary installed (apt-get install chromium)")
def test_hostile_strings_stay_text_in_the_browser(tmp_path):
    page_file = tmp_path / "evil.html"
    page_file.write_text("<!doctype html><meta charset='utf-8'><body>" + _evil_tree()._repr_html_() + "</body>",
                         encoding="utf-8")
    with ChromiumPage(page_file) as page:
        assert page.eval("document.querySelectorAll('img').length") == 0
        search_tree(page, "onerror")
        names = page.eval("[...document.querySelectorAll('li.gpc-hit > .gpc-name')].map(e => e.textContent)")
        assert names == [EVIL_NAME]
        sources = page.eval("[...document.querySelectorAll('.gpc-src')].map(e => e.textContent)")
        assert re.search(r"</script><script>window\.pwned=2</script>", sources[0])
        assert page.eval("typeof window.pwned") == "undefined"
        assert page.eval("document.querySelectorAll('img').length") == 0
        page.screenshot(tmp_path / "evil.png")
