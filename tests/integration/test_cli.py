"""The graphpatch-cache CLI: every command through click's CliRunner, and the installed entry
point in real subprocesses.

One in-process build of the tiny-gpt2 preset primes a root (module fixture); tests that
change a root work on a copy. Oracles are the files on disk, the library's own API
(CacheStore, load_cached on a from_pretrained model) and exit statuses.
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

pytestmark = pytest.mark.slow  # the module fixture builds the tiny-gpt2 preset

#: the one call the module fixture builds (the build's defaults before it built the calls people
#: make: tests/integration/test_cli_build.py): one graph keeps this module's setup cheap
ONE_CALL = ["--batch-size", "1", "--no-attention-mask", "--no-use-cache"]


@pytest.fixture(scope="module")
def built(runner, tmp_path_factory):
    """A root holding the tiny-gpt2 preset, and build's --json output."""
    root = tmp_path_factory.mktemp("cli-root") / "root"
    out = json.loads(invoke(runner, "build", "tiny-gpt2", *ONE_CALL, "--cache-dir", root, "--json").stdout)
    return root, out


@pytest.fixture
def root(built, tmp_path):
    copy = tmp_path / "root"
    shutil.copytree(built[0], copy)
    return copy


# -- build -------------------------------------------------------------------------------------
def test_build_json_matches_the_store(built, local_dir):
    root, out = built
    assert out["model"] == "tiny-gpt2" and out["source"] == "preset" and out["cached"] is False
    assert out["origin"] == "preset: tiny-gpt2" and [c["call"] for c in out["calls"]] == ["call"]
    assert out["calls"][0]["serves"] == "input_ids[1,s] int64; use_cache=False"
    assert out["model_class"].endswith("GPT2LMHeadModel") and out["dtype"] == "float32" and out["quantization"] is None
    assert out["graphs"] > 10 and out["nodes"] > out["graphs"] and out["modules"] > 10 and out["seconds"] > 0
    (entry,) = CacheStore(root, local_dir=local_dir).variants(out["key"])
    assert (entry.digest, entry.size, entry.variant) == (out["digest"], out["size"], out["variant"])
    blob = root / "objects" / out["digest"][:2] / out["digest"]
    assert blob.stat().st_size == out["size"]


def test_build_again_is_a_hit_and_human_output(runner, root, built):
    result = invoke(runner, "build", "tiny-gpt2", *ONE_CALL, "--cache-dir", root)
    assert "already cached" in result.stdout and built[1]["key"] in result.stdout
    assert "\r" not in result.stderr  # no progress drawn when stderr is not a terminal


def test_built_graph_is_what_load_cached_uses_for_from_pretrained(built, local_dir, tmp_path):
    """The preset's key is the one load_cached computes for the saved-and-reloaded model."""
    import torch
    from transformers import AutoModelForCausalLM

    from graphpatch_cache import load_cached

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(preset_config(PRESETS["tiny-gpt2"])).save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    store = CacheStore(built[0], local_dir=local_dir)
    ids = torch.randint(0, 128, (1, 5))
    pg = load_cached(model, input_ids=ids, use_cache=False, store=store)
    assert pg.cache_stats.hits == 1 and pg.cache_stats.misses == 0
    assert torch.equal(pg(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits)


def test_build_from_a_directory_gives_the_preset_key(runner, root, built, tmp_path):
    preset_config(PRESETS["tiny-gpt2"]).save_pretrained(tmp_path / "cfg")
    out = json.loads(invoke(runner, "build", tmp_path / "cfg", *ONE_CALL, "--cache-dir", root, "--json").stdout)
    assert out["source"] == "directory" and out["key"] == built[1]["key"] and out["cached"] is True


def test_build_options_change_the_key(runner, root, built):
    out = json.loads(invoke(runner, "build", "tiny-llama", "--dtype", "bfloat16", "--load-in-8bit",
                            "--batch-size", "2", "--cache-dir", root, "--json").stdout)
    assert out["dtype"] == "bfloat16" and out["quantization"] == "8bit" and out["key"] != built[1]["key"]
    rows = json.loads(invoke(runner, "ls", "--cache-dir", root, "--json").stdout)["entries"]
    assert {(r["dtype"], r["quantization"]) for r in rows} == {("float32", None), ("bfloat16", "8bit")}


def test_build_cached_generation_graphs_are_hits_for_the_real_model(runner, root):
    import torch
    from transformers import AutoModelForCausalLM

    from graphpatch_cache import load_cached

    args = ["--use-cache", "--past-length", "4", "--seq-len", "1", "--batch-size", "2", "--attention-mask"]
    out = json.loads(invoke(runner, "build", "tiny-llama", *args, "--cache-dir", root, "--json").stdout)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(PRESETS["tiny-llama"])).eval()
    prompt = torch.randint(0, 100, (2, 6))
    past = model(input_ids=prompt, use_cache=True).cache
    token = torch.randint(0, 100, (2, 1))
    mask = torch.ones(2, 7, dtype=torch.long)
    positions = torch.full((2, 1), 6)  # pg.generate's step passes them with its mask (as model.generate does)
    pg = load_cached(model, store=CacheStore(root), input_ids=token, attention_mask=mask, position_ids=positions,
                     cache=past, use_cache=True)
    assert (pg.cache_stats.hits, pg.cache_stats.misses) == (1, 0) and pg.cache_stats.keys == [out["key"]]
    again = json.loads(invoke(runner, "build", "tiny-llama", *args, "--cache-dir", root, "--json",
                              "--device-map", '{"": "cpu"}').stdout)
    assert again["cached"] is True and again["key"] == out["key"]


# -- ls, show ------------------------------------------------------------------------------------
def test_ls(runner, root, built):
    key = built[1]["key"]
    table = invoke(runner, "ls", "--cache-dir", root).stdout
    header, row = table.splitlines()
    assert header.split() == ["KEY", "MODEL", "BUILT", "FROM", "DTYPE", "SIZE", "CREATED", "TORCH", "TRANSFORMERS",
                              "CALLS"]
    assert row.startswith(key[:12]) and "GPT2LMHeadModel" in row and "float32" in row
    assert "preset: tiny-gpt2" in row and row.endswith("input_ids[1,s] int64; use_cache=False")
    out = json.loads(invoke(runner, "ls", "--cache-dir", root, "--json").stdout)
    (entry,) = out["entries"]
    assert out["root"] == str(root)
    assert entry["key"] == key and entry["size"] == built[1]["size"] and entry["intact"] is True
    assert set(entry["versions"]) >= {"torch", "transformers", "python"} and entry["created"].endswith("Z")
    assert entry["origin"] == "preset: tiny-gpt2" and entry["shape"]["kind"] == "forward"
    assert entry["shape"]["inputs"] == [{"name": "input_ids", "dtype": "int64", "dims": [1, "s"]}]
    assert entry["shape"]["use_cache"] is False and entry["shape"]["cache"] is None
    assert json.loads(invoke(runner, "ls", "--cache-dir", root / "nothing", "--json").stdout)["entries"] == []
    assert "no entries" in invoke(runner, "ls", "--cache-dir", root / "nothing").stdout


def test_show_tree_path_code_and_json(runner, root, built):
    key = built[1]["key"]
    tree = invoke(runner, "show", key[:8], "--cache-dir", root).stdout
    assert tree.startswith("<root>: GPT2LMHeadModel") and "mul_3" in tree
    shown = invoke(runner, "show", "tiny-gpt2", *ONE_CALL, "--cache-dir", root)
    assert shown.stdout == tree  # MODEL finds the same key
    assert "built from: preset: tiny-gpt2" in shown.stderr and "serves (shown): input_ids[1,s] int64" in shown.stderr
    shallow = invoke(runner, "show", key[:8], "--depth", "1", "--cache-dir", root).stdout
    assert "transformer: GPT2Model" in shallow and "h_0" not in shallow
    sub = invoke(runner, "show", key[:8], "transformer.h_0.mlp", "--grep", "act.mul_3", "--cache-dir", root).stdout
    assert sub.splitlines()[0] == "mlp: GPT2MLP" and "mul_3" in sub and "c_proj" not in sub
    code = invoke(runner, "show", key[:8], "transformer.h_0.mlp", "--code", "--cache-dir", root).stdout
    assert code.startswith("def forward(self") and "self.act" in code
    # --grep with --code: each matching graph's own code, not the root's
    grepped = invoke(runner, "show", key[:8], "--grep", "mlp.c_proj", "--code", "--cache-dir", root).stdout
    for layer in (0, 1):
        one = invoke(runner, "show", key[:8], f"transformer.h_{layer}.mlp.c_proj", "--code", "--cache-dir", root).stdout
        assert f"# transformer.h_{layer}.mlp.c_proj\n{one.strip()}\n" in grepped + "\n"
    root_code = invoke(runner, "show", key[:8], "--code", "--cache-dir", root).stdout
    assert root_code.strip() not in grepped and "# transformer.h_0.mlp.c_fc" not in grepped
    out = json.loads(invoke(runner, "show", key[:8], "--grep", "mlp.c_proj", "--code", "--json", "--cache-dir", root).stdout)
    assert {c["path"] for c in out["codes"] if c["kind"] == "graph"} == {f"transformer.h_{i}.mlp.c_proj" for i in (0, 1)}
    out = json.loads(invoke(runner, "show", key[:8], "transformer.h_0.mlp.act", "--json", "--cache-dir", root).stdout)
    assert out["key"] == key and out["kind"] == "graph" and out["origin"] == "preset: tiny-gpt2"
    assert [v["serves"] for v in out["variants"]] == ["input_ids[1,s] int64; use_cache=False"]
    paths = {n["path"]: n for n in out["nodes"]}
    assert paths["transformer.h_0.mlp.act.mul_3"]["kind"] == "value"
    assert paths["transformer.h_0.mlp.act.mul_3"]["shape"][-1] == 128


def test_show_errors(runner, root):
    result = invoke(runner, "show", "tiny-gpt2", "transformer.h_0.mlpx", *ONE_CALL, "--cache-dir", root, code=1)
    assert "no node at path" in result.stderr and "transformer.h_0.mlp" in result.stderr
    result = invoke(runner, "show", "tiny-gpt2", "--dtype", "float16", "--cache-dir", root, code=1)
    assert "not in the cache" in result.stderr and "graphpatch-cache build tiny-gpt2" in result.stderr
    assert "no cache entry" in invoke(runner, "show", "abcdef", "--cache-dir", root, code=1).stderr


# -- verify, gc, rm --------------------------------------------------------------------------------
def test_verify_ok_then_corrupt_then_fix(runner, root, built):
    out = json.loads(invoke(runner, "verify", "--cache-dir", root, "--json").stdout)
    assert out == {"root": str(root), "checked": 1, "fixed": False, "problems": []}
    assert "1 entries OK" in invoke(runner, "verify", built[1]["key"][:6], "--cache-dir", root).stdout
    blob = root / "objects" / built[1]["digest"][:2] / built[1]["digest"]
    blob.write_bytes(blob.read_bytes()[:-10] + b"0123456789")
    result = invoke(runner, "verify", "--cache-dir", root, code=1)
    assert "digest mismatch" in result.stdout
    out = json.loads(invoke(runner, "verify", "--fix", "--json", "--cache-dir", root, code=1).stdout)
    assert out["fixed"] and out["problems"][0]["key"] == built[1]["key"]
    assert not blob.exists() and any((root / "quarantine").iterdir())
    invoke(runner, "verify", "--cache-dir", root)  # nothing left to fail
    invoke(runner, "verify", "ffff", "--cache-dir", root, code=1)  # unknown key


def test_verify_rejects_a_disallowed_target(runner, root, built, local_dir):
    """A well-formed artifact (right digest, valid schema) calling os.system fails the rebuild check."""
    store = CacheStore(root, local_dir=local_dir)
    (entry,) = store.variants(built[1]["key"])
    data = json.loads(store.read_blob(entry.digest))
    for node in data["root"]["nodes"]:
        if node["op"] == "call_function":
            node["target"] = "os.system"
            break
    from graphpatch_cache import GraphArtifact

    store.put("e" * 64, GraphArtifact.from_dict(data))
    out = json.loads(invoke(runner, "verify", "eeee", "--json", "--cache-dir", root, code=1).stdout)
    assert "os.system" in out["problems"][0]["message"]


def _tree(root) -> dict:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_verify_rebuild_matches_a_built_preset_and_flags_a_changed_constant(runner, root, built, local_dir, tmp_path):
    """Built with the CLI, rebuilt byte for byte; then one float literal changed (re-digested,
    the ref pointed at it): a well-formed entry of the right structure that computes
    something else. Only --rebuild tells."""
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM

    from graphpatch_cache import load_cached

    key, digest = built[1]["key"], built[1]["digest"]
    before = _tree(root)
    out = json.loads(invoke(runner, "verify", "--rebuild", key[:8], "--json", "--cache-dir", root).stdout)
    (rebuilt,) = out["rebuilt"]
    assert rebuilt["status"] == "match" and rebuilt["digest"] == rebuilt["rebuilt_digest"] == digest
    assert _tree(root) == before

    blob = root / "objects" / digest[:2] / digest
    gelu = b'{"f":"0x1.6e4e26d4801f7p-5"}'  # NewGELU's 0.044715, in both layers
    data = blob.read_bytes()
    assert data.count(gelu) == 2
    changed = data.replace(gelu, b'{"f":"0x1.7e4e26d4801f7p-5"}', 1)
    new_digest = hashlib.sha256(changed).hexdigest()
    (root / "objects" / new_digest[:2]).mkdir(exist_ok=True)
    (root / "objects" / new_digest[:2] / new_digest).write_bytes(changed)
    ref = root / "refs" / key / f"{built[1]['variant']}.json"
    meta = json.loads(ref.read_bytes())
    meta.update(digest=new_digest, size=len(changed))
    ref.write_text(json.dumps(meta))

    assert "1 entries OK" in invoke(runner, "verify", "--cache-dir", root).stdout  # well-formed, right key
    model = AutoModelForCausalLM.from_config(preset_config(PRESETS["tiny-gpt2"])).eval()
    ids = torch.randint(0, 128, (1, 8))
    pg = load_cached(model, input_ids=ids, use_cache=False, store=CacheStore(root, local_dir=tmp_path / "local"))
    assert pg.cache_stats.hits == 1  # served, and wrong: the oracle is the model itself
    assert not torch.equal(pg(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits)

    before = _tree(root)
    result = invoke(runner, "verify", "--rebuild", key, "--cache-dir", root, code=1)
    assert "differs from the rebuild" in result.stdout and "1 of 1 entries failed" in result.stdout
    assert _tree(root) == before
    out = json.loads(invoke(runner, "verify", "--rebuild", "--fix", key, "--json", "--cache-dir", root, code=1).stdout)
    (rebuilt,) = out["rebuilt"]
    assert rebuilt["status"] == "differs" and rebuilt["digest"] == new_digest and rebuilt["rebuilt_digest"] == digest
    assert [p["kind"] for p in out["problems"]] == ["rebuild-differs"]
    assert not ref.exists() and [p.read_bytes() for p in (root / "quarantine").iterdir()] == [ref_bytes(meta)]
    assert (root / "objects" / new_digest[:2] / new_digest).exists()  # the blob may be another key's


def ref_bytes(meta: dict) -> bytes:
    return json.dumps(meta).encode()


def test_gc(runner, root, built):
    out = json.loads(invoke(runner, "gc", "--older-than", "30d", "--cache-dir", root, "--json").stdout)
    assert out["removed"] == [] and out["kept_bytes"] == built[1]["size"]
    # a duration without a unit is a usage error and removes nothing (it once meant seconds)
    before = _tree(root)
    assert "no unit" in invoke(runner, "gc", "--older-than", "30", "--cache-dir", root, code=2).stderr
    assert _tree(root) == before
    out = json.loads(invoke(runner, "gc", "--max-size", "1KB", "--dry-run", "--cache-dir", root, "--json").stdout)
    assert out["dry_run"] and out["removed"] == [f"{built[1]['key']}/{built[1]['variant']}"]
    assert (root / "refs" / built[1]["key"]).exists()
    assert "removed 1 entries" in invoke(runner, "gc", "--max-size", "0", "--cache-dir", root).stdout
    assert not (root / "refs" / built[1]["key"]).exists()
    assert "--older-than" in invoke(runner, "gc", "--older-than", "soon", "--cache-dir", root, code=2).stderr
    invoke(runner, "gc", "--max-size", "lots", "--cache-dir", root, code=2)


def test_rm(runner, root, built):
    key = built[1]["key"]
    result = invoke(runner, "rm", "nothere", "--cache-dir", root, code=1)
    assert "Error: no cache entry" in result.stderr and "Hint:" in result.stderr
    out = json.loads(invoke(runner, "rm", key[:10], "--cache-dir", root, "--json").stdout)
    assert out["removed"] == [{"key": key, "variants": 1}]
    assert not (root / "refs" / key).exists() and not (root / "objects" / built[1]["digest"][:2] / built[1]["digest"]).exists()
    invoke(runner, "rm", code=2)


def test_rm_and_gc_on_a_read_only_root_fail_and_say_so(runner, root, built):
    """A root this user cannot write (a read-only bind mount stops root too): rm and gc exit 1
    naming the root, with and without --json, and every file is still there."""
    from store_files import read_only

    key = built[1]["key"]
    before = _tree(root)
    with read_only(root):
        for args in (["rm", key[:10]], ["rm", key, "--json"], ["gc", "--max-size", "0"],
                     ["gc", "--older-than", "0s", "--json"]):
            result = invoke(runner, *args, "--cache-dir", root, code=1)
            assert "cannot remove" in result.stderr and str(root) in result.stderr, args
            assert "read-only" in result.stderr and "removed" not in result.stdout, args
        # a dry run changes nothing, so it works on a read-only root
        out = json.loads(invoke(runner, "gc", "--max-size", "0", "--dry-run", "--cache-dir", root, "--json").stdout)
        assert out["removed"] == [f"{key}/{built[1]['variant']}"]
    assert _tree(root) == before


def test_ambiguous_prefix_is_an_error(runner, root, built, local_dir):
    store = CacheStore(root, local_dir=local_dir)
    artifact = store.get(built[1]["key"])
    store.put(built[1]["key"][:2] + "0" * 62, artifact)
    store.put(built[1]["key"][:2] + "1" * 62, artifact)
    assert "ambiguous" in invoke(runner, "rm", built[1]["key"][:2], "--cache-dir", root, code=1).stderr


# -- export, import, info ------------------------------------------------------------------------
def test_export_import_round_trip(runner, root, built, tmp_path, local_dir):
    key = built[1]["key"]
    file = tmp_path / "g.json"
    out = json.loads(invoke(runner, "export", key[:7], "-o", file, "--cache-dir", root, "--json").stdout)
    assert out == {"key": key, "file": str(file), "variants": 1, "size": file.stat().st_size}
    payload = json.loads(file.read_bytes())
    assert payload["format"] == "graphpatch-cache-portable" and payload["key"] == key and len(payload["artifacts"]) == 1
    other = tmp_path / "other"
    out = json.loads(invoke(runner, "import", file, "--cache-dir", other, "--json").stdout)
    assert out["key"] == key and out["matches_environment"] is True
    assert out["variants"] == [{"variant": built[1]["variant"], "digest": built[1]["digest"], "size": built[1]["size"]}]
    # byte-identical blob under the same key: the imported entry is the exported one
    assert (other / "objects" / built[1]["digest"][:2] / built[1]["digest"]).read_bytes() == \
        (root / "objects" / built[1]["digest"][:2] / built[1]["digest"]).read_bytes()
    assert "1 entries OK" in invoke(runner, "verify", "--cache-dir", other).stdout


def redigested(payload: dict) -> str:
    """A portable file whose sha256 matches its (edited) artifacts: well-formed, not damaged."""
    from graphpatch_cache.artifact import portable_digest

    return json.dumps(dict(payload, sha256=portable_digest(payload["artifacts"])))


def test_import_validates(runner, root, built, tmp_path):
    key = built[1]["key"]
    good = tmp_path / "g.json"
    invoke(runner, "export", key, "-o", good, "--cache-dir", root)
    payload = json.loads(good.read_bytes())
    bad = tmp_path / "bad.json"
    broken = json.loads(json.dumps(payload))
    del broken["artifacts"][0]["root"]["nodes"]
    bad.write_text(redigested(broken))
    target = tmp_path / "target"
    assert "bad.json" in invoke(runner, "import", bad, "--cache-dir", target, code=1).stderr
    bad.write_text(json.dumps(broken))  # the same edit without a new digest: a damaged file
    assert "does not match its sha256" in invoke(runner, "import", bad, "--cache-dir", target, code=1).stderr
    bad.write_text("{not json")
    assert "not a graph artifact" in invoke(runner, "import", bad, "--cache-dir", target, code=1).stderr
    newer = json.loads(json.dumps(payload))
    newer["artifacts"][0]["schema_version"] = 99
    bad.write_text(redigested(newer))
    assert "schema_version 99" in invoke(runner, "import", bad, "--cache-dir", target, code=1).stderr
    keyless = dict(payload)
    del keyless["key"]
    bad.write_text(json.dumps(keyless))
    assert "--key" in invoke(runner, "import", bad, "--cache-dir", target, code=1).stderr
    invoke(runner, "import", bad, "--key", "abc", "--cache-dir", target, code=1)
    assert not (target / "refs").exists()  # nothing stored from a bad file
    invoke(runner, "import", bad, "--key", key, "--cache-dir", target)
    invoke(runner, "import", tmp_path / "missing.json", "--cache-dir", target, code=1)


def test_exported_file_loads_with_patchable_graph_load(runner, root, built, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from graphpatch_cache import PatchableGraph

    invoke(runner, "export", built[1]["key"], "-o", tmp_path / "g.json", "--cache-dir", root)
    model = AutoModelForCausalLM.from_config(preset_config(PRESETS["tiny-gpt2"])).eval()
    pg = PatchableGraph.load(tmp_path / "g.json", model)
    ids = torch.randint(0, 128, (1, 4))
    assert torch.equal(pg(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits)


def test_info(runner, root, built, local_dir):
    from graphpatch_cache.cache import environment_fingerprint

    out = json.loads(invoke(runner, "info", "--cache-dir", root, "--json").stdout)
    assert out["environment"] == environment_fingerprint()
    assert out["cache"]["root"] == str(root) and out["cache"]["root_from"] == "--cache-dir"
    assert out["cache"]["local"] == str(local_dir) and out["cache"]["local_from"] == "GRAPHPATCH_CACHE_LOCAL_DIR"
    assert out["cache"]["entries"] == 1 and out["cache"]["size"] == built[1]["size"]
    assert 1 in out["supported_schema_versions"]
    text = invoke(runner, "info", "--cache-dir", root).stdout
    assert "torch" in text and str(root) in text


# -- the installed entry point -------------------------------------------------------------------
@pytest.mark.subprocess
def test_installed_entry_point_in_subprocesses(tmp_path):
    exe = shutil.which("graphpatch-cache", path=str(Path(sys.executable).parent)) or shutil.which("graphpatch-cache")
    assert exe, "graphpatch-cache is not installed (pip install -e .)"
    env = {**os.environ, "GRAPHPATCH_CACHE_DIR": str(tmp_path / "root"),
           "GRAPHPATCH_CACHE_LOCAL_DIR": str(tmp_path / "local"), "HF_HUB_OFFLINE": "1"}
    build = subprocess.run([sys.executable, "-m", "graphpatch_cache", "build", "tiny-gpt2", *ONE_CALL, "--json"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    built = json.loads(build.stdout)  # nothing but the JSON document on stdout
    assert built["root"] == str(tmp_path / "root")
    listing = subprocess.run([exe, "ls", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    (entry,) = json.loads(listing.stdout)["entries"]
    assert entry["key"] == built["key"] and entry["digest"] == built["digest"]
    failing = subprocess.run([exe, "show", "0123"], env=env, capture_output=True, text=True, timeout=120)
    assert failing.returncode == 1 and failing.stdout == ""
    assert failing.stderr.startswith("Error: ") and "Traceback" not in failing.stderr
    usage = subprocess.run([exe, "gc", "--older-than", "x"], env=env, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2
