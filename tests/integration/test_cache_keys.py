"""Cache keys: everything that determines the graphs changes the key; nothing else does.

Different key: number of layers, dtype, extraction options, the source of a model class,
torch/transformers versions, sdpa vs eager attention, tied vs untied weights.

Same key (and a cache hit through ``load_cached``): another ``config._name_or_path``, another
cache location, another working directory, other parameter values, another batch size or
sequence length (both >= 2), the same model saved to and loaded from two directories, and a
second process.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
import uuid
from pathlib import Path

import pytest
import torch

from graphpatch_cache import CacheStore, cache_key, load_cached

from tiny_models import tiny_gpt2, tiny_llama, token_inputs

pytestmark = pytest.mark.slow  # load_cached extracts GPT-2s

TESTS_DIR = Path(__file__).resolve().parents[1] / "helpers"  # tiny_models, for the child process


def _key(model, **inputs):
    return cache_key(model, **(inputs or token_inputs()))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def base_key(gpt2):
    return _key(gpt2)


def _write_module(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))
    st = path.stat()  # make sure the mtime moves on even on coarse-clock filesystems
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000 * (1 + int(uuid.uuid4().int % 7))))


_HELPER_SRC = """
import torch


def act(x):
    return torch.relu(x) * {factor}
"""

_USER_SRC = """
import torch
from {helper} import act


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return act(self.lin(x))
"""


def test_helper_source_change_is_never_served_stale(tmp_path, monkeypatch):
    """A helper in another file that forward() calls is inlined by dynamo. Keys are computed
    before tracing, so the key stays; but every artifact records the digests of the files it
    traced, and a hit re-checks them: after the edit load_cached extracts anew."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    tag = uuid.uuid4().hex[:8]
    helper, user = f"gpc_helper_{tag}", f"gpc_user_{tag}"
    _write_module(tmp_path / f"{helper}.py", _HELPER_SRC.format(factor=2))
    _write_module(tmp_path / f"{user}.py", _USER_SRC.format(helper=helper))
    try:
        x = torch.randn(2, 4)
        store = CacheStore(tmp_path / "root", local_dir=tmp_path / "local")
        torch.manual_seed(0)
        model_a = importlib.import_module(user).Net()
        pg_a = load_cached(model_a, x, store=store)
        before = model_a(x)
        assert pg_a.cache_stats.misses == 1 and torch.equal(pg_a(x), before)
        assert load_cached(model_a, x, store=store).cache_stats.hits == 1
        _write_module(tmp_path / f"{helper}.py", _HELPER_SRC.format(factor=3))
        importlib.reload(importlib.import_module(helper))
        torch.manual_seed(0)
        model_b = importlib.reload(importlib.import_module(user)).Net()
        assert not torch.equal(before, model_b(x))
        pg_b = load_cached(model_b, x, store=store)
        assert pg_b.cache_stats.misses == 1, "a stale graph was served after the helper changed"
        assert torch.equal(pg_b(x), model_b(x))
    finally:
        sys.modules.pop(helper, None)
        sys.modules.pop(user, None)


_NOTEBOOK_SRC = """
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x)) * {factor}
"""


def _notebook_net(factor: int) -> torch.nn.Module:
    """A class defined like a notebook cell: its module has no source file."""
    mod = types.ModuleType("__gpc_notebook__")
    mod.torch = torch
    sys.modules["__gpc_notebook__"] = mod  # like __main__ in a notebook: imported, no __file__
    exec(compile(_NOTEBOOK_SRC.format(factor=factor), "<cell>", "exec"), mod.__dict__)
    torch.manual_seed(0)
    return mod.Net()


def test_sourceless_class_change_changes_key(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "__gpc_notebook__", raising=False)
    x = torch.randn(2, 4)
    store = CacheStore(tmp_path / "root", local_dir=tmp_path / "local")
    model_a = _notebook_net(2)
    load_cached(model_a, x, store=store)
    model_b = _notebook_net(3)  # the "cell" re-run with another forward
    assert not torch.equal(model_a(x), model_b(x))
    pg_b = load_cached(model_b, x, store=store)
    assert torch.equal(pg_b(x), model_b(x)), f"stale graph from the cache (stats {pg_b.cache_stats})"


def _save_and_reload(model, dirs):
    from transformers import AutoModelForCausalLM

    out = []
    for d in dirs:
        model.save_pretrained(d)
        loaded = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
        assert loaded.config._name_or_path == str(d)
        out.append(loaded)
    return out


# ------------------------------------------------------------------------------------------------
# Same key -> cache hit through load_cached
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def primed(tmp_path_factory, gpt2):
    """A store holding the base GPT-2's graphs (one miss)."""
    tmp = tmp_path_factory.mktemp("primed")
    store = CacheStore(tmp / "root", local_dir=tmp / "local")
    pg = load_cached(gpt2, store=store, **token_inputs())
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 0)
    return store, pg.cache_stats.keys[0]


def _assert_hit(model, store, key, **inputs):
    inputs = inputs or token_inputs()
    pg = load_cached(model, store=store, **inputs)
    assert pg.cache_stats.misses == 0 and pg.cache_stats.hits >= 1
    assert pg.cache_stats.keys[0] == key
    with torch.no_grad():
        assert torch.equal(_logits(pg(**inputs)), _logits(model(**inputs)))
    return pg


def test_hit_same_model(primed, gpt2, base_key):
    store, key = primed
    assert key == base_key
    _assert_hit(gpt2, store, key)


def test_hit_other_name_or_path(primed):
    store, key = primed
    model = tiny_gpt2()
    model.config._name_or_path = "/mnt/team/models/gpt2-tiny"
    _assert_hit(model, store, key)


def test_hit_other_weights(primed):
    store, key = primed
    _assert_hit(tiny_gpt2(seed=7), store, key)


def test_hit_other_batch_and_seq(primed, gpt2):
    store, key = primed
    _assert_hit(gpt2, store, key, **token_inputs(batch=3, seq=13, seed=5))


def test_hit_other_working_directory(primed, gpt2, tmp_path):
    store, key = primed
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        _assert_hit(gpt2, store, key)
    finally:
        os.chdir(old)


def test_hit_other_cache_location(primed, gpt2, tmp_path):
    store, key = primed
    moved = tmp_path / "moved" / "root"
    shutil.copytree(store.root, moved)
    _assert_hit(gpt2, CacheStore(moved, local_dir=tmp_path / "fresh_local"), key)
    # the local tier alone is not what hits: no local tier at all
    _assert_hit(gpt2, CacheStore(moved, local_dir=False), key)


def test_hit_save_pretrained_two_dirs(tmp_path):
    store = CacheStore(tmp_path / "root", local_dir=tmp_path / "local")
    a, b = _save_and_reload(tiny_gpt2(), [tmp_path / "one", tmp_path / "two"])
    first = load_cached(a, store=store, **token_inputs())
    assert first.cache_stats.misses == 1
    _assert_hit(b, store, first.cache_stats.keys[0])


# ------------------------------------------------------------------------------------------------
# Another process
# ------------------------------------------------------------------------------------------------

_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from tiny_models import tiny_gpt2, tiny_llama, token_inputs
from graphpatch_cache import cache_key
print(json.dumps([cache_key(tiny_gpt2(), **token_inputs()), cache_key(tiny_llama(), **token_inputs())]))
"""


@pytest.mark.subprocess
def test_two_processes_same_key(tmp_path):
    expected = [cache_key(tiny_gpt2(), **token_inputs()), cache_key(tiny_llama(), **token_inputs())]
    code = _CHILD.format(tests=str(TESTS_DIR))
    procs = []
    for i, seed in enumerate(("1", "4242")):
        cwd = tmp_path / f"p{i}"
        cwd.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1]) == expected
