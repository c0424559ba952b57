"""Every Python block in the README runs, in order, in one namespace: the README cannot rot."""

import re
import sys
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the README's blocks extract GPT-2s

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(_blocks()) >= 6


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # a real module, as a notebook's __main__ is: classes defined in the README belong to it
    # (dynamo imports a traced class's module)
    module = types.ModuleType("__readme__")
    monkeypatch.setitem(sys.modules, "__readme__", module)
    namespace: dict = module.__dict__
    for i, block in enumerate(_blocks()):
        try:
            exec(compile(block, f"README.md block {i + 1}", "exec"), namespace)
        except Exception as exc:  # name the block that broke
            pytest.fail(f"README python block {i + 1} failed: {type(exc).__name__}: {exc}\n{block}")
    printed = capsys.readouterr().out
    assert "torch.Size([2, 16, 256])" in printed
    assert "torch.float32" in printed
    assert "torch.Size([2, 4, 16, 16]) 17" in printed  # the cached step: cache input, new length
    assert "NotPicklableError" in printed and "NodePathError" in printed  # Coming from graphpatch
    assert "removed (10):" in printed and "transformer (GPT2Model): -zeros, -mask" in printed  # diff_graphs
    assert "['transformer.h_0.mlp.act.mul_3'] ['transformer.h_0.attn.attn_weights_3']" in printed
