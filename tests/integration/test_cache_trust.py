"""What a shared cache may and may not do to a teammate (issue 9, the cache side).

- An entry proves it belongs to its key: a ref naming an intact blob of another model is
  quarantined (warned once) and the graph rebuilt, never a failure and never a wrong graph.
- ``verify`` checks what the loader checks and the proof, and without ``--fix`` changes
  nothing on disk; ``--fix`` quarantines.
- Source checks never import a name an artifact gives.
- Portable files carry a digest of their content.
- ``verify_rebuild`` refuses what it would have to import.

Oracles: the model's own output (torch.equal), bytes and sha256 of every file under the root,
marker files written by planted packages, and warnings actually raised.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from graphpatch_cache import PatchableGraph, cache_key, load_cached
from graphpatch_cache.artifact import portable_digest
from graphpatch_cache.cache import CacheStore, RebuildError, rebuild_artifact, verify_rebuild
from graphpatch_cache.cli.main import cli
from graphpatch_cache.errors import ArtifactFormatError

from tiny_models import tiny_gpt2, token_inputs

pytestmark = pytest.mark.slow  # the module fixtures extract GPT-2s

GELU_C = '{"f":"0x1.6e4e26d4801f7p-5"}'  # NewGELU's 0.044715, as the artifact stores it


# ------------------------------------------------------------------------------------------------
# helpers


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree(root: Path) -> dict:
    """Every file under ``root`` (relative path -> sha256): the whole tree, byte for byte."""
    return {str(p.relative_to(root)): sha256(p.read_bytes()) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def only_ref(root: Path, key: str) -> Path:
    (ref,) = sorted((Path(root) / "refs" / key).glob("*.json"))
    return ref


def blob_path(root: Path, digest: str) -> Path:
    return Path(root) / "objects" / digest[:2] / digest


def write_blob(root: Path, data: bytes) -> str:
    digest = sha256(data)
    path = blob_path(root, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def point_ref_at(ref: Path, data: bytes, root: Path) -> str:
    """Store ``data`` as a blob and make ``ref`` name it (digest and size), as a writer of
    the shared root could."""
    digest = write_blob(root, data)
    meta = json.loads(ref.read_bytes())
    meta.update(digest=digest, size=len(data))
    ref.write_text(json.dumps(meta, sort_keys=True))
    return digest


def logits(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return module(**inputs).logits


def cache_warnings(record) -> list:
    return [w for w in record if "graphpatch_cache" in str(w.message)]


def store(root: Path) -> CacheStore:
    return CacheStore(root, local_dir=False)


@pytest.fixture(scope="module")
def primed(tmp_path_factory):
    """Two cached models (1-layer and 2-layer tiny GPT-2, same inputs): their roots, keys,
    models and expected logits."""
    base = tmp_path_factory.mktemp("trust")
    inputs = token_inputs()
    out = {"inputs": inputs}
    for name, n_layer in (("a", 1), ("b", 2)):
        model = tiny_gpt2(n_layer=n_layer)
        pg = load_cached(model, store=store(base / name), **inputs)
        assert pg.cache_stats.misses == 1
        out[name] = {"model": model, "root": base / name, "key": cache_key(model, **inputs),
                     "expected": logits(model, inputs)}
    return out


@pytest.fixture
def root_a(primed, tmp_path):
    shutil.copytree(primed["a"]["root"], tmp_path / "root")
    return tmp_path / "root"


def b_blob_and_ref(primed) -> tuple:
    ref = only_ref(primed["b"]["root"], primed["b"]["key"])
    meta = json.loads(ref.read_bytes())
    return blob_path(primed["b"]["root"], meta["digest"]).read_bytes(), ref.read_bytes()


# ------------------------------------------------------------------------------------------------
# point 5: one bad ref must not poison a key


@pytest.mark.parametrize("planted", ["digest-only", "whole-ref"])
def test_a_ref_naming_another_models_blob_is_quarantined_and_rebuilt(primed, root_a, planted):
    """The 2-layer model's intact blob under the 1-layer model's key: either only the digest
    was changed (the ref still records the 1-layer key material) or the 2-layer model's
    whole ref was copied there."""
    a = primed["a"]
    inputs = primed["inputs"]
    ref = only_ref(root_a, a["key"])
    good_digest = json.loads(ref.read_bytes())["digest"]
    good_blob = blob_path(root_a, good_digest).read_bytes()
    b_data, b_ref = b_blob_and_ref(primed)
    if planted == "digest-only":
        point_ref_at(ref, b_data, root_a)
    else:
        write_blob(root_a, b_data)
        ref.write_bytes(b_ref)
    bad_ref = ref.read_bytes()

    # verify sees it, and changes nothing
    before = tree(root_a)
    (problem,) = store(root_a).verify()
    assert problem.kind == "wrong-key" and problem.key == a["key"]
    assert "does not belong to its key" in problem.message
    assert tree(root_a) == before

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(a["model"], store=store(root_a), **inputs)
    found = cache_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    assert "does not belong to key" in str(found[0].message) and str(ref) in str(found[0].message)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 0)
    assert torch.equal(logits(pg, inputs), a["expected"])
    quarantined = [p.read_bytes() for p in (root_a / "quarantine").iterdir()]
    assert quarantined == [bad_ref]  # the ref only: the other model's blob is intact ...
    assert blob_path(root_a, sha256(b_data)).read_bytes() == b_data  # ... and may be another key's
    assert json.loads(ref.read_bytes())["digest"] == good_digest  # rebuilt: the right blob again
    assert blob_path(root_a, good_digest).read_bytes() == good_blob
    assert store(root_a).verify() == []
    again = load_cached(a["model"], store=store(root_a), **inputs)
    assert (again.cache_stats.misses, again.cache_stats.hits) == (0, 1)
    assert torch.equal(logits(again, inputs), a["expected"])


def test_refs_record_the_key_material_less_the_structure(primed):
    a = primed["a"]
    meta = json.loads(only_ref(a["root"], a["key"]).read_bytes())
    from graphpatch_cache.cache import key_material
    from graphpatch_cache.cache.keys import digest_of

    material = key_material(a["model"], (), primed["inputs"])
    assert set(meta["material"]) == {"environment", "model", "inputs", "options"}
    assert "modules" not in meta["material"]["model"] and "tensors" not in meta["material"]["model"]
    artifact = json.loads(blob_path(a["root"], meta["digest"]).read_bytes())
    full = dict(meta["material"], model=dict(meta["material"]["model"], **artifact["extraction"]["structure"]))
    assert full == json.loads(json.dumps(material)) and digest_of(full) == a["key"]
    assert meta["example"]["leaves"][0] == {"kind": "tensor", "dtype": "int64", "device": "cpu", "dims": [2, 8]}
    assert len(json.dumps(meta)) < 8000  # small: refs are read on every lookup


# ------------------------------------------------------------------------------------------------
# point 8: verify is read-only without --fix, reports every problem; --fix quarantines


def test_verify_without_fix_changes_nothing_and_reports_each_problem(primed, root_a):
    a = primed["a"]
    s = store(root_a)
    # 1. a malformed ref under its own key
    bad_key = "1" * 64
    (root_a / "refs" / bad_key).mkdir()
    (root_a / "refs" / bad_key / "0123456789abcdef.json").write_bytes(b'{"digest": ')
    # 2. a corrupt blob: the 1-layer graph under another key (own bytes), one byte flipped
    artifact = s.get(a["key"])
    import dataclasses

    corrupt = s.put("2" * 64, dataclasses.replace(artifact, model_class="corrupt.Model"))
    path = blob_path(root_a, corrupt.digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    # 3. an intact blob of the 2-layer model, with its whole ref, under a third key
    b_data, b_ref = b_blob_and_ref(primed)
    write_blob(root_a, b_data)
    (root_a / "refs" / ("3" * 64)).mkdir()
    (root_a / "refs" / ("3" * 64) / "planted.json").write_bytes(b_ref)

    before = tree(root_a)
    report = s.check()
    assert report.checked == 4
    kinds = {p.key[:1]: p.kind for p in report.problems}
    assert kinds == {"1": "malformed-ref", "2": "corrupt-blob", "3": "wrong-key"}
    assert tree(root_a) == before
    runner = CliRunner()
    result = runner.invoke(cli, ["verify", "--cache-dir", str(root_a)])
    assert result.exit_code == 1
    assert "3 of 4 entries failed" in result.stdout and "verify --fix" in result.stdout
    for prefix in ("1" * 12, "2" * 12, "3" * 12):
        assert prefix in result.stdout
    out = json.loads(runner.invoke(cli, ["verify", "--json", "--cache-dir", str(root_a)]).stdout)
    assert out["checked"] == 4 and sorted(p["kind"] for p in out["problems"]) == [
        "corrupt-blob", "malformed-ref", "wrong-key"]
    assert tree(root_a) == before  # byte-identical after three read-only verifies
    assert not (root_a / "quarantine").exists()

    result = runner.invoke(cli, ["verify", "--fix", "--cache-dir", str(root_a)])
    assert result.exit_code == 1 and "quarantined" in result.stdout
    quarantined = sorted(sha256(p.read_bytes()) for p in (root_a / "quarantine").iterdir())
    moved = sorted(before[k] for k in (f"refs/{bad_key}/0123456789abcdef.json",
                                       f"objects/{corrupt.digest[:2]}/{corrupt.digest}",
                                       f"refs/{'2' * 64}/{corrupt.variant}.json",
                                       f"refs/{'3' * 64}/planted.json"))
    assert quarantined == moved
    assert blob_path(root_a, sha256(b_data)).exists()  # intact, merely under a wrong key: kept
    result = runner.invoke(cli, ["verify", "--cache-dir", str(root_a)])
    assert result.exit_code == 0 and "1 entries OK" in result.stdout
    pg = load_cached(a["model"], store=s, **primed["inputs"])
    assert pg.cache_stats.hits == 1 and torch.equal(logits(pg, primed["inputs"]), a["expected"])


def test_an_entry_without_key_material_is_reported_as_unproven(primed, root_a):
    """What ``import --key`` of a pg.save() file stores: load_cached checks it against the
    live model (a hit), verify cannot prove it."""
    a = primed["a"]
    s = store(root_a)
    ref = only_ref(root_a, a["key"])
    meta = json.loads(ref.read_bytes())
    del meta["material"], meta["example"]
    ref.write_text(json.dumps(meta))
    (problem,) = s.verify()
    assert problem.kind == "unproven" and "records no key material" in problem.message
    pg = load_cached(a["model"], store=s, **primed["inputs"])
    assert pg.cache_stats.hits == 1 and torch.equal(logits(pg, primed["inputs"]), a["expected"])


# ------------------------------------------------------------------------------------------------
# point 6: nothing named by an artifact is imported




def test_source_checks_never_import_a_name_from_the_artifact(primed, root_a, planted_package):
    name, marker, folder = planted_package
    a = primed["a"]
    ref = only_ref(root_a, a["key"])
    payload = json.loads(blob_path(root_a, json.loads(ref.read_bytes())["digest"]).read_bytes())
    # the recorded digest matches the planted file: the check passes (a hit) by reading it
    payload["extraction"]["sources"][f"{name}.sub.mod"] = sha256((folder / "sub" / "mod.py").read_bytes())
    point_ref_at(ref, json.dumps(payload, sort_keys=True, separators=(",", ":")).encode(), root_a)
    pg = load_cached(a["model"], store=store(root_a), **primed["inputs"])
    assert pg.cache_stats.hits == 1
    assert torch.equal(logits(pg, primed["inputs"]), a["expected"])
    assert not marker.exists() and name not in sys.modules

    # a digest that does not match: a miss, extracted anew; still nothing imported
    payload["extraction"]["sources"] = {name: "0" * 64}
    point_ref_at(ref, json.dumps(payload, sort_keys=True, separators=(",", ":")).encode(), root_a)
    pg = load_cached(a["model"], store=store(root_a), **primed["inputs"])
    assert (pg.cache_stats.hits, pg.cache_stats.misses) == (0, 1)
    assert torch.equal(logits(pg, primed["inputs"]), a["expected"])
    assert not marker.exists() and name not in sys.modules


# ------------------------------------------------------------------------------------------------
# point 8: portable files carry a digest of their content


def test_a_portable_file_with_one_byte_changed_in_a_float_constant_is_refused(primed, tmp_path):
    a = primed["a"]
    pg = load_cached(a["model"], store=store(primed["a"]["root"]), **primed["inputs"])
    path = tmp_path / "graphs.json"
    pg.save(path)
    good = path.read_bytes()
    assert json.loads(good)["sha256"] == portable_digest(json.loads(good)["artifacts"])
    assert good.count(GELU_C.encode()) == 1
    damaged = good.replace(GELU_C.encode(), GELU_C.replace("1.6e4e", "1.7e4e").encode())  # one byte
    assert sum(x != y for x, y in zip(good, damaged)) == 1 and len(good) == len(damaged)
    path.write_bytes(damaged)
    with pytest.raises(ArtifactFormatError) as info:
        PatchableGraph.load(path, a["model"])
    assert "does not match its sha256" in str(info.value) and info.value.path == str(path)
    # the oracle for "it would have loaded silently": the same bytes with a matching digest load
    payload = json.loads(damaged)
    payload["sha256"] = portable_digest(payload["artifacts"])
    path.write_text(json.dumps(payload))
    changed = PatchableGraph.load(path, a["model"])
    assert not torch.equal(logits(changed, primed["inputs"]), a["expected"])
    path.write_bytes(good)
    assert torch.equal(logits(PatchableGraph.load(path, a["model"]), primed["inputs"]), a["expected"])


def test_portable_files_without_a_digest_are_refused_with_a_hint(primed, tmp_path):
    a = primed["a"]
    ref = only_ref(a["root"], a["key"])
    blob = blob_path(a["root"], json.loads(ref.read_bytes())["digest"]).read_bytes()
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": "graphpatch-cache-portable", "artifacts": [json.loads(blob)]}))
    with pytest.raises(ArtifactFormatError) as info:
        PatchableGraph.load(path, a["model"])
    assert "no sha256" in info.value.message and "export" in info.value.hint and "pg.save" in info.value.hint
    path.write_bytes(blob)  # a bare artifact (a cache blob) carries no digest either
    with pytest.raises(ArtifactFormatError) as info:
        PatchableGraph.load(path, a["model"])
    assert "bare graph artifact" in info.value.message and "export" in info.value.hint


def test_import_refuses_graphs_that_do_not_belong_to_the_key_and_stores_nothing(primed, tmp_path):
    runner = CliRunner()
    a = primed["a"]
    file = tmp_path / "a.json"
    assert runner.invoke(cli, ["export", a["key"], "-o", str(file), "--cache-dir", str(a["root"])]).exit_code == 0
    target = tmp_path / "target"
    result = runner.invoke(cli, ["import", str(file), "--key", primed["b"]["key"], "--cache-dir", str(target)])
    assert result.exit_code == 1 and "does not belong to key" in result.stderr
    assert not target.exists() or not any(target.rglob("*.json"))
    out = json.loads(runner.invoke(cli, ["import", str(file), "--json", "--cache-dir", str(target)]).stdout)
    assert out["proven"] is True and out["key"] == a["key"]
    assert store(target).verify() == []


# ------------------------------------------------------------------------------------------------
# point 4: rebuilds never import what an entry names


class _Custom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x))


def test_rebuild_of_an_entry_load_cached_stored_from_a_cpu_model_matches(primed):
    """Not only `build` entries (meta device): a teammate's load_cached on a real CPU model
    rebuilds byte for byte too (zero weights on the CPU, buffers with their values)."""
    a = primed["a"]
    before = tree(a["root"])
    (report,) = verify_rebuild(store(a["root"]), a["key"])
    assert report.ok, report.message
    assert report.rebuilt_digest == report.digest == json.loads(only_ref(a["root"], a["key"]).read_bytes())["digest"]
    assert tree(a["root"]) == before


def test_rebuild_refuses_a_model_that_is_not_a_transformers_model(tmp_path):
    s = store(tmp_path / "root")
    x = torch.randn(2, 4)
    load_cached(_Custom(), x, store=s)
    before = tree(tmp_path / "root")
    (report,) = verify_rebuild(s, cache_key(_Custom(), x))
    assert report.status == "cannot-rebuild" and not report.ok
    assert "not a transformers model" in report.message and "_Custom" in report.message
    assert tree(tmp_path / "root") == before


def test_rebuild_plans_come_only_from_transformers_own_mappings(primed, planted_package):
    name, marker, _ = planted_package
    a = primed["a"]
    s = store(a["root"])
    (entry,) = s.variants(a["key"])
    from graphpatch_cache.cache.proof import complete_material

    artifact = s.get(a["key"])
    material = complete_material(entry.material, artifact)

    def refused(**changes):
        model = dict(material["model"], **changes.pop("model", {}))
        bad = dict(material, model=model)
        with pytest.raises(RebuildError) as info:
            rebuild_artifact(bad, entry.example, artifact.extraction)
        return info.value.message

    assert "not a transformers model" in refused(model={"model_class": f"{name}.sub.mod.Model"})
    assert "not a transformers model" in refused(model={"model_class": "os.system"})
    assert "is not a class transformers maps" in refused(
        model={"model_class": "transformers.models.gpt2.modeling_gpt2.GPT2Attention"})
    assert "is not a class transformers maps" in refused(
        model={"model_class": "transformers.models.llama.modeling_llama.LlamaForCausalLM"})  # a gpt2 config
    config = material["model"]["config"]
    assert "no model_type" in refused(model={"config": dict(config, model_type=name)})
    assert "remote code" in refused(model={"config": dict(config, auto_map={"AutoModel": f"{name}.Model"})})
    assert "names code to download" in refused(model={"config": dict(config, _attn_implementation=f"{name}/kernel")})
    assert "attention implementation" in refused(model={"config": dict(config, _attn_implementation="flash_attention_2")})
    opts = dict(material["options"], classes_to_skip_compiling=[f"{name}.sub.mod.Block"])
    with pytest.raises(RebuildError, match="name classes or functions"):
        rebuild_artifact(dict(material, options=opts), entry.example, artifact.extraction)
    assert not marker.exists() and name not in sys.modules
