"""``pg.graph`` in a real notebook: a kernel runs the cells, the saved HTML goes to Chromium.

A notebook (built with nbformat) runs in an ipykernel kernel of this interpreter (nbclient):
it defines a tiny model, calls ``load_cached`` twice (the second call a hit, asserted in the
kernel from ``pg.cache_stats``), patches a node (the patched output checked against the
model's own output, in the kernel) and displays ``pg.graph``. The saved notebook's
``text/html`` output must hold every node path of the graph (oracle: the paths the same
artifact's tree lists here, outside the kernel) and its ``text/plain`` the text tree.

Then the HTML, as saved, is opened in headless Chromium (driven over the DevTools protocol):
typing into the search box must leave exactly the rows whose paths contain the text marked
as matches (their ancestors shown as context, nothing else), a click on a name must copy
its path, and the text must keep its contrast in the light and the dark colour scheme.
Screenshots are kept under the test's tmp dir. Only the browser part is skipped, where no
Chromium is installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import nbclient  # the dev extra: nbclient, nbformat, ipykernel
import nbformat
import pytest

from chromium_page import ChromiumPage, chromium_binary, search_tree

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

ROOT = Path(__file__).resolve().parents[2]
KERNEL = "graphpatch-cache-test"

CELLS = [
    """
    import torch
    from graphpatch_cache import CacheStore, ZeroPatch, load_cached

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(8, 16)
            self.down = torch.nn.Linear(16, 8)

        def forward(self, x):
            hidden = torch.nn.functional.gelu(self.up(x))
            return x + self.down(hidden)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(32, 8)
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.head = torch.nn.Linear(8, 32)

        def forward(self, ids):
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    torch.manual_seed(0)
    model = Tiny().eval()
    ids = torch.randint(0, 32, (2, 5))
    store = CacheStore(STORE_ROOT, local_dir=LOCAL_DIR)
    """,
    """
    first = load_cached(model, ids, store=store)
    pg = load_cached(model, ids, store=store)
    assert (first.cache_stats.misses, first.cache_stats.hits) == (1, 0), first.cache_stats
    assert (pg.cache_stats.hits, pg.cache_stats.misses) == (1, 0), pg.cache_stats
    print("hits", pg.cache_stats.hits)
    """,
    """
    with pg.patch({"blocks_1.hidden": ZeroPatch()}):
        patched = pg(ids)
    x = model.blocks[0](model.embed(ids))
    expected = model.head(x + model.blocks[1].down.bias)  # gelu's output zeroed: down(0) is its bias
    assert torch.equal(patched, expected)
    assert torch.equal(pg(ids), model(ids))
    print("patched ok")
    """,
    "pg.graph",
]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook, executed and saved; the graph's node paths as this process reads them."""
    base = tmp_path_factory.mktemp("notebook")
    spec_dir = base / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    # this interpreter as the kernel, importing this checkout's graphpatch_cache (in CI the
    # editable install points at it too)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "GRAPHPATCH_CACHE_DIR": str(base / "default-root"), "GRAPHPATCH_CACHE_LOCAL_DIR": str(base / "default-local"),
           "OMP_NUM_THREADS": "1"}
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "graphpatch-cache tests", "language": "python", "env": env}))
    setup = f"STORE_ROOT = {str(base / 'root')!r}\nLOCAL_DIR = {str(base / 'local')!r}\n"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(setup + textwrap.dedent(CELLS[0]).strip())]
    nb.cells += [nbformat.v4.new_code_cell(textwrap.dedent(c).strip()) for c in CELLS[1:]]
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(base / "jupyter")
    try:
        client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                                         resources={"metadata": {"path": str(base)}})
        client.execute()
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old
    saved = base / "graph.ipynb"
    nbformat.write(nb, saved)
    # the oracle: the stored artifact's node tree, read here without a model
    from graphpatch_cache import CacheStore
    from graphpatch_cache.cache import node_tree

    store = CacheStore(base / "root", local_dir=base / "local")
    (entry,) = [e for key in store.keys() for e in store.variants(key)]
    tree = node_tree(store.load_entry(entry))
    paths = tree._np_all_paths()
    return base, nbformat.read(saved, as_version=4), [p for p in paths if p], tree


def _outputs(cell):
    """A cell's rich outputs by MIME type, and ``text``: what it printed on stdout (stderr holds
    the extraction's progress, which may come in several pieces, before or after)."""
    shown = {k: v for out in cell.outputs for k, v in out.get("data", {}).items()}
    shown["text"] = "".join(out.get("text", "") for out in cell.outputs if out.get("name") == "stdout")
    return shown


def test_the_kernel_hits_the_cache_patches_and_shows_every_node_path(executed):
    _base, nb, paths, tree = executed
    assert "hits 1" in _outputs(nb.cells[1])["text"]
    assert "patched ok" in _outputs(nb.cells[2])["text"]
    shown = _outputs(nb.cells[3])
    page = shown["text/html"]
    assert len(paths) > 40 and "blocks_1.hidden" in paths and "blocks_0.up.linear" in paths
    missing = [p for p in paths if f'"{p}"' not in page]  # each path, as a JSON string of the data blob
    assert not missing, missing[:10]
    assert shown["text/plain"] == repr(tree)  # the plain repr is the text tree, unchanged
    assert "<script" in page and "http" not in page.replace("http-equiv", "")  # inline, no network


@pytest.mark.skipif(chromium_binary() is None, reason="no chromium binary installed (apt-get install chromium)")
def test_the_saved_html_filters_and_copies_in_chromium(executed):
    base, nb, paths, _tree = executed
    page_file = base / "graph.html"
    page_file.write_text('<!doctype html><html><head><meta charset="utf-8"><title>pg.graph</title></head><body>'
                         + _outputs(nb.cells[3])["text/html"] + "</body></html>", encoding="utf-8")
    rows = ("[...document.querySelectorAll('li[data-path]')].filter(e => e.offsetParent !== null)"
            ".map(e => [e.getAttribute('data-path'), e.classList.contains('gpc-hit')])")
    with ChromiumPage(page_file) as page:
        top = page.eval(rows)
        assert sorted(p for p, _ in top) == [p for p in paths if "." not in p and "|" not in p]  # collapsed: top level only
        search_tree(page, "up.lin")
        shown = page.eval(rows)
        expected = sorted(p for p in paths if "up.lin" in p)
        assert expected == ["blocks_0.up.linear", "blocks_1.up.linear"]
        assert sorted(p for p, hit in shown if hit) == expected
        ancestors = {p.rsplit(".", n)[0] for p in expected for n in (1, 2)}
        assert sorted(p for p, hit in shown if not hit) == sorted(ancestors)
        assert page.eval("document.querySelector('.gpc-status').textContent") == "2 matching paths"
        page.screenshot(base / "filtered.png")
        # a click on a name copies its path (the status line says what was copied)
        page.eval("document.querySelector('li.gpc-hit > .gpc-name').click()")
        assert page.eval("document.querySelector('.gpc-status').textContent") == "copied: blocks_0.up.linear"
        contrast = """(() => {
          const lum = c => { const [r, g, b] = c.match(/[0-9.]+/g).slice(0, 3).map(Number).map(v => v / 255)
            .map(v => v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4); return 0.2126*r + 0.7152*g + 0.0722*b; };
          const box = document.querySelector('.gpc-tree'), name = box.querySelector('.gpc-name'),
                label = box.querySelector('.gpc-label');
          const bg = lum(getComputedStyle(box).backgroundColor);
          const ratio = el => { const f = lum(getComputedStyle(el).color); return (Math.max(f, bg) + 0.05) / (Math.min(f, bg) + 0.05); };
          return [getComputedStyle(box).backgroundColor, ratio(name), ratio(label)]; })()"""
        for scheme in ("light", "dark"):
            page.call("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": scheme}])
            background, name_ratio, label_ratio = page.eval(contrast)
            assert name_ratio >= 7 and label_ratio >= 4.5, (scheme, background, name_ratio, label_ratio)
            page.screenshot(base / f"filtered-{scheme}.png")
    assert (base / "filtered-dark.png").stat().st_size > 1000
