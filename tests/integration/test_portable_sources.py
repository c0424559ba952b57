"""Extracted artifacts hold no path of the machine that wrote them: the same model code
installed in two places extracts to the same bytes (what ``verify --rebuild`` compares
across teammates), and node source lines name the model's own code, never this package's
call markers."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest
import torch

from graphpatch_cache.extraction import extract
from graphpatch_cache.options import ExtractionOptions

pytestmark = pytest.mark.slow  # two extractions

MODEL = textwrap.dedent('''
    import torch


    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.lin(x)) * 2


    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            h = self.block(x)
            return self.head(h + x)
''')
NAME = "gpc_portable_model"


def _extract_from(site, monkeypatch):
    package = site / "models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / f"{NAME}.py").write_text(MODEL)
    monkeypatch.syspath_prepend(str(site))
    for mod in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
        del sys.modules[mod]
    importlib.invalidate_caches()
    module = importlib.import_module(f"models.{NAME}")
    torch.manual_seed(0)
    model = module.Net().eval()
    artifact = extract(model, (torch.randn(3, 4),), {}, ExtractionOptions())
    return artifact.to_json()


def _sources(data):
    out = []

    def walk(graph):
        out.extend(n["meta"]["source"] for n in graph["nodes"] if "source" in n["meta"])
        for child in graph["children"]:
            walk(child)

    walk(data["root"])
    return out


def test_two_installs_extract_the_same_bytes(tmp_path, monkeypatch):
    first = _extract_from(tmp_path / "install-a" / "lib", monkeypatch)
    with monkeypatch.context() as m:
        second = _extract_from(tmp_path / "second-install" / "site", m)
    assert str(tmp_path) not in first and str(tmp_path) not in second
    assert first == second  # byte-identical artifacts from two locations of one source file
    sources = _sources(json.loads(first))
    assert sources, "extraction records source lines"
    assert all(s.startswith(f'File "models/{NAME}.py", line ') for s in sources), sources


def test_a_module_output_names_the_callers_line_not_the_markers(tmp_path, monkeypatch):
    data = json.loads(_extract_from(tmp_path / "lib", monkeypatch))
    block = next(c for c in data["root"]["children"] if c["name"] == "block")
    sources = " ".join(_sources(data))
    assert "graphpatch_cache" not in sources and "forward_with_markers" not in sources
    assert any("return torch.relu(self.lin(x)) * 2" in s for s in _sources({"root": block}))
