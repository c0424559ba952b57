"""``graphpatch-cache build MODEL`` with no call-shape option: the calls people make.

One module fixture saves a tiny Llama with random weights (``save_pretrained``) and builds
its directory with the CLI's defaults. The oracle of the main test runs in a fresh Python
process: the real model loaded from that directory, called as a tokenizer's padded batch
and as ``pg.generate`` calls it, must be served without a single extraction (no
``NewVariantWarning``, not one new ref in the store) and equal the plain model exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_run import invoke
from graphpatch_cache import CacheStore
from graphpatch_cache.cli.presets import PRESETS, preset_config

pytestmark = pytest.mark.slow  # the module fixture builds every default call of a tiny Llama

REPO = Path(__file__).resolve().parents[2]

CALLS = ["forward", "forward, one sequence", "generate: prompt", "generate: prompt, one sequence",
         "generate: step", "generate: step, one sequence"]


@pytest.fixture(scope="module")
def built(runner, tmp_path_factory):
    """(root, build's --json output, the model's directory)."""
    import torch
    from transformers import AutoModelForCausalLM

    base = tmp_path_factory.mktemp("cli-build")
    torch.manual_seed(0)
    config = preset_config(PRESETS["tiny-llama"])
    config.num_hidden_layers = 1  # one layer: six extractions stay cheap
    AutoModelForCausalLM.from_config(config).save_pretrained(base / "model")
    out = json.loads(invoke(runner, "build", base / "model", "--cache-dir", base / "root", "--json").stdout)
    return base / "root", out, base / "model"


@pytest.fixture
def root(built, tmp_path):
    copy = tmp_path / "root"
    shutil.copytree(built[0], copy)
    return copy


_FRESH_PROCESS = r"""
import json, sys, warnings
import torch
from transformers import AutoModelForCausalLM
from graphpatch_cache import CacheStore, NewVariantWarning, load_cached

root, local, folder = sys.argv[1:4]
store = CacheStore(root, local_dir=local)
refs = lambda: sorted(f"{e.key}/{e.variant}" for e in store.entries())
before = refs()
model = AutoModelForCausalLM.from_pretrained(folder).eval()
g = torch.Generator().manual_seed(1)
lengths, width = [7, 5, 3, 6], 7
ids = torch.randint(1, 128, (4, width), generator=g)
mask = torch.zeros(4, width, dtype=torch.long)
for row, n in enumerate(lengths):  # a tokenizer's batch, padded on the left for generation
    mask[row, width - n:] = 1
    ids[row, :width - n] = 0
one, one_mask = ids[:1], mask[:1]  # one text: a tokenizer's single sequence has no padding
same = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pg = load_cached(model, store=store, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        for name, (i, m) in {"batch": (ids, mask), "one": (one, one_mask)}.items():
            mine, theirs = pg(input_ids=i, attention_mask=m), model(input_ids=i, attention_mask=m)
            same[f"forward {name}"] = torch.equal(mine.logits, theirs.logits)
            same[f"forward {name} returns a cache"] = mine.cache is not None and theirs.cache is not None
            generated = pg.generate(i, attention_mask=m, max_new_tokens=4)
            expected = model.generate(i, attention_mask=m, max_new_tokens=4, do_sample=False)
            same[f"generate {name}"] = torch.equal(generated, expected)
    # no mask at all: pg.generate makes the one model.generate makes, so the same graphs serve
    same["generate one, no mask"] = torch.equal(pg.generate(one, max_new_tokens=4),
                                                model.generate(one, max_new_tokens=4, do_sample=False))
print(json.dumps({"same": same, "misses": pg.cache_stats.misses, "hits": pg.cache_stats.hits,
                  "new_variant_warnings": [str(w.message) for w in caught if issubclass(w.category, NewVariantWarning)],
                  "before": before, "after": refs()}))
"""


@pytest.mark.subprocess
def test_the_default_build_serves_a_tokenizer_batch_and_generate_in_a_fresh_process(built, tmp_path):
    root, _out, folder = built
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(root), str(tmp_path / "local"), str(folder)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["new_variant_warnings"] == []
    assert result["misses"] == 0 and result["hits"] >= 3  # the forward call and generate's two graphs
    assert result["after"] == result["before"]  # not one entry extracted and stored
    assert result["same"] == dict.fromkeys(result["same"], True) and len(result["same"]) == 7


def test_build_json_lists_every_call_and_ls_and_show_say_what_they_serve(runner, built):
    root, out, folder = built
    assert out["source"] == "directory" and out["origin"] == f"directory: {folder.resolve()}"
    assert [c["call"] for c in out["calls"]] == CALLS and out["cached"] is False
    made = [c for c in out["calls"] if c["key"] is not None]
    for call in out["calls"]:  # each call built, or served by the graph of its batch >= 2 twin
        assert call["key"] is not None or call["served_by"] in {c["key"] for c in made}, call
    assert out["key"] == made[0]["key"] and out["calls"][0]["serves"] == \
        "input_ids[b>=1,s] int64, attention_mask[b>=1,s] int64; use_cache: model default"
    by_call = {c["call"]: c for c in made}
    assert by_call["generate: prompt"]["shape"]["kind"] == "prefill"
    assert [t["name"] for t in by_call["generate: prompt"]["shape"]["inputs"]] == \
        ["input_ids", "attention_mask", "position_ids"]  # pg.generate on a padded batch
    step = by_call["generate: step"]["shape"]
    # (b>=1: the batch-2 graphs serve a batch of 1 too)
    assert step["kind"] == "decode" and step["cache"]["dims"][:3] == ["b>=1", 2, "past"] and step["cache"]["layers"] == 1
    assert step["inputs"][0] == {"name": "input_ids", "dtype": "int64", "dims": ["b>=1", 1]}
    store = CacheStore(root)
    assert sorted(f"{e.key}/{e.variant}" for e in store.entries()) == sorted(f"{c['key']}/{c['variant']}" for c in made)
    assert {e.origin for e in store.entries()} == {out["origin"]}
    rows = json.loads(invoke(runner, "ls", "--cache-dir", root, "--json").stdout)["entries"]
    assert {r["serves"] for r in rows} == {c["serves"] for c in made}
    table = invoke(runner, "ls", "--cache-dir", root).stdout
    assert "cache: decode (1 layer [b>=1,2,past,8] float32)" in table and "directory: " in table
    shown = invoke(runner, "show", folder, "--depth", "0", "--cache-dir", root)
    assert shown.stdout.startswith("<root>: LlamaForCausalLM") and f"built from: {out['origin']}" in shown.stderr
    assert f"serves (shown): {out['calls'][0]['serves']}" in shown.stderr
    again = invoke(runner, "build", folder, "--cache-dir", root)
    assert "already cached" in again.stdout and again.stdout.count("cached") >= len(made)


def test_a_call_shape_option_builds_that_one_call(runner, root, built):
    """Narrowed to calls the default build made (so nothing is extracted): one call each."""
    _root, out, folder = built
    by_call = {c["call"]: c for c in out["calls"]}
    got = json.loads(invoke(runner, "build", folder, "--batch-size", "1", "--cache-dir", root, "--json").stdout)
    (call,) = got["calls"]
    assert call["cached"] is True and call["serves"] == \
        "input_ids[b>=1,s] int64, attention_mask[b>=1,s] int64; use_cache: model default"  # the batch-2 graph
    assert call["key"] in (by_call["forward, one sequence"]["key"], by_call["forward, one sequence"]["served_by"])
    got = json.loads(invoke(runner, "build", folder, "--batch-size", "1", "--past-length", "8", "--cache-dir", root,
                            "--json").stdout)
    (call,) = got["calls"]  # --past-length implies --use-cache and one token: generate's step
    # with the mask and the position ids pg.generate passes, so the default build's step graph
    # (batch 2, serving batch 1 too) serves it
    assert call["cached"] is True and call["shape"]["kind"] == "decode"
    assert [(i["name"], i["dims"]) for i in call["shape"]["inputs"] if i["name"] != "attention_mask"] == \
        [("input_ids", ["b>=1", 1]), ("position_ids", ["b>=1", 1])]
    assert "key      " in invoke(runner, "build", folder, "--batch-size", "1", "--cache-dir", root).stdout


def test_rm_and_export_take_a_model_name_as_show_does(runner, root, built, tmp_path):
    _root, out, folder = built
    made = {c["key"] for c in out["calls"] if c["key"]}
    got = json.loads(invoke(runner, "export", folder, "-o", tmp_path / "g.json", "--cache-dir", root, "--json").stdout)
    assert got["key"] == out["key"] and (tmp_path / "g.json").stat().st_size == got["size"]  # the forward call's
    assert "did you mean tiny-llama" in invoke(runner, "rm", "tiny-lama", "--cache-dir", root, code=1).stderr
    removed = json.loads(invoke(runner, "rm", folder, "--cache-dir", root, "--json").stdout)["removed"]
    assert {r["key"] for r in removed} == made and not any((root / "refs" / k).exists() for k in made)
    assert "is not in the cache" in invoke(runner, "rm", folder, "--cache-dir", root, code=1).stderr


def test_origin_is_display_text_escaped_clipped_and_never_a_reason_to_refuse(runner, root, built):
    from graphpatch_cache.cache.records import ORIGIN_LIMIT

    key, variant = built[1]["key"], built[1]["variant"]
    ref = root / "refs" / key / f"{variant}.json"
    meta = json.loads(ref.read_bytes())
    meta["origin"] = "\x1b[2J\x1b[31mevil\r" + "x" * 1000
    ref.write_text(json.dumps(meta))
    (row,) = [r for r in json.loads(invoke(runner, "ls", "--cache-dir", root, "--json").stdout)["entries"]
              if r["key"] == key]
    assert len(row["origin"]) == ORIGIN_LIMIT and row["origin"].endswith("x" * 50)  # the end kept
    meta["origin"] = "\x1b[31mevil\r"
    ref.write_text(json.dumps(meta))
    table = invoke(runner, "ls", "--cache-dir", root).stdout
    assert "\x1b" not in table and "\r" not in table and "\\x1b[31mevil\\r" in table
    shown = invoke(runner, "show", key, "--depth", "0", "--cache-dir", root)
    assert "\x1b" not in shown.stderr and "\\x1b[31mevil" in shown.stderr
    meta["origin"] = {"not": "text"}  # not a string: no origin shown, the entry still serves
    ref.write_text(json.dumps(meta))
    (entry,) = [e for e in CacheStore(root).variants(key) if e.variant == variant]
    assert entry.origin is None
    assert "1 entries OK" in invoke(runner, "verify", key, "--cache-dir", root).stdout
