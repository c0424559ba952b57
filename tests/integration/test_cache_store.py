"""The graph cache (CacheStore + load_cached) on tiny GPT-2s.

Oracles are independent of the library where possible: bytes and sha256 of files on disk,
the unwrapped model's own output (torch.equal), extraction counts, and separate processes.
One in-process extraction primes a root (``m1`` in tests/integration/conftest.py, shared with
the other test_cache_store_*.py files) that tests copy, so most tests do
not extract at all.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import shutil
import stat
import time
import warnings
from pathlib import Path

import pytest
import torch

import graphpatch_cache._files as files_mod
from graphpatch_cache import PatchableGraph, ProbePatch, ZeroPatch, cache_key, load_cached
from graphpatch_cache.cache.backend import PosixRoot
from graphpatch_cache.errors import ArtifactFormatError, CacheMissError, ModelStructureError

from store_files import blobs, cache_warnings, corrupt, files_under, logits, read_only, refs, sha256_file, store
from tiny_models import tiny_gpt2, token_inputs

pytestmark = pytest.mark.slow  # m1 (integration conftest) extracts a GPT-2
MUL3 = "transformer.h_0.mlp.act.mul_3"  # NewGELU's output in block 0


# ------------------------------------------------------------------------------------------------
# 1. layout, hits


def test_layout_after_a_miss(m1):
    model, inputs, expected, root, _, fresh = m1
    (blob,) = blobs(root)
    assert blob.parent.name == blob.name[:2]
    assert sha256_file(blob) == blob.name
    assert blob.read_bytes() == fresh.artifact.to_json().encode()
    assert json.loads(blob.read_bytes())["schema_version"] == 1
    (ref,) = refs(root)
    key = cache_key(model, **inputs)
    assert ref.parent.name == key
    meta = json.loads(ref.read_bytes())
    assert meta["digest"] == blob.name
    assert meta["size"] == blob.stat().st_size
    assert not files_under(root / "tmp")
    assert not (root / "quarantine").exists()


@pytest.mark.parametrize("local", ["local", "no-local"])
def test_hit_is_exact_and_has_the_same_paths(m1, primed, local):
    model, inputs, expected, _, _, fresh = m1
    root, local_dir = primed
    pg = load_cached(model, store=store(root, local_dir if local == "local" else False), **inputs)
    assert (pg.cache_stats.hits, pg.cache_stats.misses, pg.cache_stats.write_failures) == (1, 0, 0)
    assert torch.equal(logits(pg, inputs), expected)
    assert repr(pg.graph) == repr(fresh.graph)
    assert sorted(pg.graph._np_index) == sorted(fresh.graph._np_index)
    assert pg.artifact.to_json() == fresh.artifact.to_json()


def test_hit_patches_like_a_fresh_graph_and_like_a_hook(m1, primed):
    model, inputs, expected, _, _, fresh = m1
    pg = load_cached(model, store=store(*primed), **inputs)
    assert pg.cache_stats.hits == 1
    # oracle: zero the GELU output with a forward hook on the unwrapped model
    act = model.transformer.h[0].mlp.act
    seen = {}

    def hook(module, args, out):
        seen["act"] = out.detach().clone()
        return torch.zeros_like(out)

    handle = act.register_forward_hook(hook)
    try:
        oracle = logits(model, inputs)
    finally:
        handle.remove()
    results = []
    for graph in (pg, fresh):
        with graph.patch({MUL3: [probe := ProbePatch(), ZeroPatch()]}):
            out = logits(graph, inputs)
        results.append(out)
        assert torch.equal(probe.activation, seen["act"])
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0], oracle)
    assert not torch.equal(oracle, expected)
    assert torch.equal(logits(pg, inputs), expected)  # patches are gone after the block


# ------------------------------------------------------------------------------------------------
# 4. corruption


def _local_value_files(local: Path) -> list:
    return sorted(local.rglob("*.val"))


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("local", ["no-local", "local-corrupt-too"])
def test_corrupt_blob_is_quarantined_warned_and_rebuilt(m1, primed, how, local):
    model, inputs, expected, *_ = m1
    root, local_dir = primed
    (blob,) = blobs(root)
    good = blob.read_bytes()
    bad = corrupt(blob, how)
    if local == "local-corrupt-too":
        (val,) = _local_value_files(local_dir)
        assert val.read_bytes() == good
        corrupt(val, how)
    s = store(root, local_dir if local != "no-local" else False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, store=s, **inputs)
    found = cache_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    assert str(blob) in str(found[0].message) and "digest" in str(found[0].message)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 0)
    assert torch.equal(logits(pg, inputs), expected)
    quarantined = files_under(root / "quarantine")
    assert [q.read_bytes() for q in quarantined] == [bad]
    assert blob.read_bytes() == good  # rebuilt in place
    assert s.verify() == []
    again = load_cached(model, store=store(root, False), **inputs)
    assert again.cache_stats.hits == 1


def test_corrupt_local_copy_is_dropped_and_the_shared_blob_used(m1, primed):
    model, inputs, expected, *_ = m1
    root, local_dir = primed
    (blob,) = blobs(root)
    (val,) = _local_value_files(local_dir)
    corrupt(val, "flip")
    s = store(root, local_dir)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, store=s, **inputs)
    assert not cache_warnings(record)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (0, 1)
    assert torch.equal(logits(pg, inputs), expected)
    assert not (root / "quarantine").exists()  # the shared blob is fine
    assert sha256_file(blob) == blob.name
    assert s.local.get_blob(blob.name) == blob.read_bytes()  # the local copy was replaced


# ------------------------------------------------------------------------------------------------
# 5. refs naming missing blobs, malformed refs


def test_ref_to_missing_blob_is_a_miss(m1, primed):
    model, inputs, expected, *_ = m1
    root, _ = primed
    (blob,) = blobs(root)
    good = blob.read_bytes()
    blob.unlink()
    s = store(root, False)
    assert not s.contains(cache_key(model, **inputs))
    pg = load_cached(model, store=s, **inputs)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 0)
    assert torch.equal(logits(pg, inputs), expected)
    assert blob.read_bytes() == good
    assert s.contains(cache_key(model, **inputs))


def test_ref_to_unknown_digest_is_a_miss(m1, primed):
    model, inputs, expected, *_ = m1
    root, _ = primed
    (ref,) = refs(root)
    meta = json.loads(ref.read_bytes())
    meta["digest"] = hashlib.sha256(b"nothing").hexdigest()
    ref.write_text(json.dumps(meta))
    pg = load_cached(model, store=store(root, False), **inputs)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 0)
    assert torch.equal(logits(pg, inputs), expected)


def test_malformed_ref_is_quarantined_and_a_miss(m1, primed):
    model, inputs, expected, *_ = m1
    root, _ = primed
    (ref,) = refs(root)
    ref.write_bytes(b'{"digest": ')
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, store=store(root, False), **inputs)
    assert len(cache_warnings(record)) == 1
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 0)
    assert torch.equal(logits(pg, inputs), expected)
    assert [q.read_bytes() for q in files_under(root / "quarantine")] == [b'{"digest": ']
    assert json.loads(ref.read_bytes())["digest"] == blobs(root)[0].name


# ------------------------------------------------------------------------------------------------
# 6. unknown schema_version


@pytest.mark.parametrize("local", ["local", "no-local"])
def test_unknown_schema_version_is_a_clear_error(m1, primed, local):
    model, inputs, *_ = m1
    root, local_dir = primed
    (blob,) = blobs(root)
    (ref,) = refs(root)
    payload = json.loads(blob.read_bytes())
    payload["schema_version"] = 99
    data = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(data).hexdigest()
    new_blob = root / "objects" / digest[:2] / digest
    new_blob.parent.mkdir(parents=True, exist_ok=True)
    new_blob.write_bytes(data)
    meta = json.loads(ref.read_bytes())
    meta.update(digest=digest, size=len(data), schema_version=99)
    ref.write_text(json.dumps(meta))
    with pytest.raises(ArtifactFormatError) as info:
        load_cached(model, store=store(root, local_dir if local == "local" else False), **inputs)
    message = str(info.value)
    assert str(new_blob) in message
    assert "[1]" in message and "99" in message
    assert info.value.path == str(new_blob)
    assert new_blob.read_bytes() == data  # an intact file is not quarantined
    problems = store(root, False).verify()
    assert [p.path for p in problems] == [str(new_blob)]


# ------------------------------------------------------------------------------------------------
# 7. read-only or full cache


def _two_loads(model, inputs, expected, make_store):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pgs = [load_cached(model, store=make_store(), **inputs) for _ in range(2)]
    for pg in pgs:
        assert (pg.cache_stats.misses, pg.cache_stats.write_failures) == (1, 1)
        assert torch.equal(logits(pg, inputs), expected)
    found = cache_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    return str(found[0].message)


def _writable(path) -> bool:
    try:
        (path / "probe").write_bytes(b"")
    except OSError:
        return False
    (path / "probe").unlink()
    return True


def test_read_only_root_chmod(m1, tmp_path):
    """A root nobody may write: chmod 0555, and where that does not stop this user (root
    ignores modes) a read-only bind mount of it, which stops root too (store_files.read_only)."""
    model, inputs, expected, *_ = m1
    root = tmp_path / "ro"
    root.mkdir()
    with read_only(root):
        message = _two_loads(model, inputs, expected, lambda: store(root, tmp_path / "local"))
    assert str(root) in message


def test_root_that_is_a_file(m1, tmp_path):
    model, inputs, expected, *_ = m1
    root = tmp_path / "not-a-dir"
    root.write_bytes(b"a file")
    message = _two_loads(model, inputs, expected, lambda: store(root, tmp_path / "local"))
    assert str(root) in message
    assert root.read_bytes() == b"a file"


def test_full_disk_leaves_nothing_half_written(m1, tmp_path, monkeypatch):
    model, inputs, expected, *_ = m1
    root = tmp_path / "root"
    code = errno.ENOSPC
    real_open = open

    class Failing:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def write(self, data):
            self.f.write(data[: len(data) // 3])
            raise OSError(code, os.strerror(code))

    def failing_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Failing(f) if "w" in mode else f

    monkeypatch.setattr(files_mod, "open", failing_open, raising=False)
    message = _two_loads(model, inputs, expected, lambda: store(root, tmp_path / "local"))
    assert str(root) in message and os.strerror(code) in message
    assert not files_under(root / "tmp")
    assert not blobs(root) and not refs(root)


def _refuse(self, name, data):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), self.location(name))


def test_read_only_filesystem_is_one_warning(m1, tmp_path, monkeypatch):
    model, inputs, expected, *_ = m1
    root = tmp_path / "root"
    monkeypatch.setattr(PosixRoot, "write", _refuse)
    message = _two_loads(model, inputs, expected, lambda: store(root, tmp_path / "local"))
    assert str(root) in message and os.strerror(errno.EROFS) in message


def test_read_only_root_still_serves_hits(m1, primed, monkeypatch):
    model, inputs, expected, *_ = m1
    root, _ = primed
    monkeypatch.setattr(PosixRoot, "write", _refuse)
    before = {p: p.read_bytes() for p in files_under(root)}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, store=store(root, False), **inputs)
    assert not cache_warnings(record)
    assert (pg.cache_stats.hits, pg.cache_stats.misses, pg.cache_stats.write_failures) == (1, 0, 0)
    assert torch.equal(logits(pg, inputs), expected)
    assert {p: p.read_bytes() for p in files_under(root)} == before


def test_a_lock_that_is_never_released_only_delays(m1, tmp_path):
    """Correctness never depends on the lock: on timeout the caller extracts anyway."""
    import fcntl

    model, inputs, expected, *_ = m1
    root = tmp_path / "root"
    key = cache_key(model, **inputs)
    (root / "locks").mkdir(parents=True)
    with open(root / "locks" / f"{key}.lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # as if a hung process held it
        started = time.monotonic()
        pg = load_cached(model, store=store(root, False, lock_timeout=0.5), **inputs)
        elapsed = time.monotonic() - started
    assert elapsed >= 0.5
    assert (pg.cache_stats.misses, pg.cache_stats.write_failures) == (1, 0)
    assert torch.equal(logits(pg, inputs), expected)
    assert len(refs(root)) == 1 and store(root, False).verify() == []


# ------------------------------------------------------------------------------------------------
# 8. group-shared roots


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_setgid_root_makes_group_writable_files(m1, tmp_path, umask_022):
    model, inputs, expected, *_ = m1
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o2775)
    if not root.stat().st_mode & stat.S_ISGID:
        pytest.skip("this filesystem drops the setgid bit")
    pg = load_cached(model, store=store(root, tmp_path / "local"), **inputs)
    assert pg.cache_stats.misses == 1
    (blob,) = blobs(root)
    good = blob.read_bytes()
    corrupt(blob, "flip")
    s = store(root, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert s.read_blob(blob.name) is None  # creates quarantine/
    s.put(cache_key(model, **inputs), pg.artifact)  # rewrites the blob
    assert blob.read_bytes() == good
    dirs = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
    files = files_under(root)
    assert {d.name for d in dirs} >= {"objects", "refs", "tmp", "quarantine", blob.name[:2]}
    assert len(files) >= 3  # blob, ref, quarantined blob (and lock files)
    bad_dirs = [(str(d), oct(d.stat().st_mode)) for d in dirs if d.stat().st_mode & 0o2070 != 0o2070]
    assert not bad_dirs
    bad_files = [(str(f), oct(f.stat().st_mode)) for f in files
                 if f.stat().st_mode & 0o060 != 0o060 and "locks" not in f.parts]
    assert not bad_files


def test_setgid_root_lock_files_are_group_writable(m1, tmp_path, umask_022):
    model, inputs, expected, *_ = m1
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o2775)
    if not root.stat().st_mode & stat.S_ISGID:
        pytest.skip("this filesystem drops the setgid bit")
    with store(root, False).lock(cache_key(model, **inputs)) as acquired:
        assert acquired
    locks = files_under(root / "locks")
    assert locks
    assert all(f.stat().st_mode & 0o060 == 0o060 for f in locks), [oct(f.stat().st_mode) for f in locks]


# ------------------------------------------------------------------------------------------------
# 9. the local tier


def test_local_tier_memoizes_blobs_by_digest(m1):
    import diskcache

    _, _, _, root, local_dir, _ = m1
    (blob,) = blobs(root)
    with diskcache.Cache(str(local_dir)) as cache:
        assert cache.get(f"blob:{blob.name}") == blob.read_bytes()


def test_local_copy_serves_a_ref_whose_shared_blob_was_deleted(m1, primed):
    """The local copy is verified by its digest, so serving it is correct; it also restores
    the shared blob (tests/integration/test_cache_repair.py)."""
    model, inputs, expected, *_ = m1
    root, local_dir = primed
    shutil.rmtree(root / "objects")
    with pytest.warns(UserWarning, match="repaired from your verified local copy"):
        pg = load_cached(model, store=store(root, local_dir), **inputs)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (0, 1)
    assert torch.equal(logits(pg, inputs), expected)
    (blob,) = blobs(root)
    assert sha256_file(blob) == blob.name
    # so a reader without the local tier hits too
    pg = load_cached(model, store=store(root, False), **inputs)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (0, 1)


def test_deleting_the_local_dir_between_calls_is_harmless(m1, primed):
    model, inputs, expected, *_ = m1
    root, local_dir = primed
    s = store(root, local_dir)
    pg = load_cached(model, store=s, **inputs)
    assert pg.cache_stats.hits == 1
    shutil.rmtree(local_dir)
    pg = load_cached(model, store=s, **inputs)  # same store object, its diskcache deleted under it
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (0, 1)
    assert torch.equal(logits(pg, inputs), expected)
    shutil.rmtree(local_dir, ignore_errors=True)
    s2 = store(root, local_dir)  # a new store object
    pg = load_cached(model, store=s2, **inputs)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (0, 1)
    assert torch.equal(logits(pg, inputs), expected)
    (blob,) = blobs(root)
    assert s2.local.get_blob(blob.name) == blob.read_bytes()  # re-memoized
    assert not (root / "quarantine").exists()


# ------------------------------------------------------------------------------------------------
# 11. graph variants


def test_a_second_signature_is_stored_under_its_own_key(m1, primed):
    model, inputs, expected, *_ = m1
    root, local_dir = primed
    masked = token_inputs(mask=True)
    s = store(root, local_dir)
    pg = load_cached(model, store=s, **inputs)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (0, 1)
    assert torch.equal(logits(pg, masked), logits(model, masked))
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 1)
    assert len(pg.variants) == 2
    key_masked = cache_key(model, **masked)
    assert key_masked != cache_key(model, **inputs)
    assert set(pg.cache_stats.keys) == {cache_key(model, **inputs), key_masked}
    assert sorted(e.key for e in s.entries()) == sorted({cache_key(model, **inputs), key_masked})
    assert len(blobs(root)) == 2 and s.verify() == []
    again = load_cached(model, store=store(root, False), **masked)
    assert (again.cache_stats.misses, again.cache_stats.hits) == (0, 1)
    assert torch.equal(logits(again, masked), logits(model, masked))
    assert torch.equal(logits(again, inputs), expected)  # the unmasked graph: another hit
    assert (again.cache_stats.misses, again.cache_stats.hits) == (0, 2)


# ------------------------------------------------------------------------------------------------
# 12. portable files


def test_save_and_load_are_exact(m1, tmp_path):
    model, inputs, expected, _, _, fresh = m1
    path = tmp_path / "graph.json"
    fresh.save(path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    other = tiny_gpt2(n_layer=1, seed=7)  # same structure, other weights
    pg = PatchableGraph.load(path, other)
    assert torch.equal(logits(pg, inputs), logits(other, inputs))
    assert not torch.equal(logits(other, inputs), expected)
    assert repr(pg.graph) == repr(fresh.graph)
    assert sorted(pg.graph._np_index) == sorted(fresh.graph._np_index)
    pg = PatchableGraph.load(str(path), model)
    assert torch.equal(logits(pg, inputs), expected)


def _differing_params(a, b) -> set:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return {n for n in pa.keys() | pb.keys() if n not in pa or n not in pb or pa[n].shape != pb[n].shape}


def test_load_onto_a_model_with_another_width_names_the_parameter(m1, tmp_path):
    model, inputs, _, _, _, fresh = m1
    path = tmp_path / "graph.json"
    fresh.save(path)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=48, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    config._attn_implementation = "sdpa"
    wide = GPT2LMHeadModel(config).eval()
    with pytest.raises(ModelStructureError) as info:
        PatchableGraph.load(path, wide)
    differing = _differing_params(model, wide)
    assert any(name in str(info.value) for name in differing), str(info.value)


def test_load_onto_a_model_with_fewer_layers_names_the_module(tmp_path):
    model2 = tiny_gpt2(n_layer=2)
    inputs = token_inputs()
    path = tmp_path / "graph2.json"
    PatchableGraph(model2, **inputs).save(path)
    with pytest.raises(ModelStructureError) as info:
        PatchableGraph.load(path, tiny_gpt2(n_layer=1))
    assert "transformer.h.1" in str(info.value)


def test_load_onto_a_model_with_more_layers_is_refused(m1, tmp_path):
    model, inputs, _, _, _, fresh = m1
    path = tmp_path / "graph.json"
    fresh.save(path)
    deeper = tiny_gpt2(n_layer=2)
    try:
        pg = PatchableGraph.load(path, deeper)
    except ModelStructureError as exc:
        assert "transformer.h.1" in str(exc) or "n_layer" in str(exc)
        return
    # if it binds, it must at least compute the deeper model's output
    assert torch.equal(logits(pg, inputs), logits(deeper, inputs))


def test_load_errors(m1, tmp_path):
    model = m1[0]
    missing = tmp_path / "nope.json"
    with pytest.raises(CacheMissError) as info:
        PatchableGraph.load(missing, model)
    assert str(missing) in str(info.value)
    for name, content in [("junk.json", b"hello, not json"), ("empty.json", b""), ("dict.json", b"{}"),
                          ("list.json", b"[1, 2]")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ArtifactFormatError) as info:
            PatchableGraph.load(path, model)
        assert str(path) in str(info.value), name
        assert info.value.path == str(path)


# ------------------------------------------------------------------------------------------------
# 13. memory: a hit binds the model's own tensors


def _rss() -> int:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


def test_hit_does_not_copy_parameters(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=512, n_head=8, vocab_size=16384, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config).eval()
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    assert param_bytes >= 40 * 1024**2
    inputs = token_inputs(vocab=16384)
    root = tmp_path / "root"
    first = load_cached(model, store=store(root, tmp_path / "local"), **inputs)
    assert first.cache_stats.misses == 1
    del first
    before = _rss()
    pg = load_cached(model, store=store(root, tmp_path / "local"), **inputs)
    after = _rss()
    assert pg.cache_stats.hits == 1
    assert after - before < 0.25 * param_bytes, (after - before, param_bytes)
    used = dict(pg.named_parameters())
    assert used
    own_ids = {id(p) for p in params}
    own_ptrs = {p.data_ptr() for p in params}
    assert {id(p) for p in used.values()} == own_ids
    assert {p.data_ptr() for p in used.values()} == own_ptrs
    own_buffers = {id(b) for b in model.buffers()}
    graph_modules = [m for m in pg.modules() if isinstance(m, torch.fx.GraphModule)]
    assert graph_modules
    for gm in graph_modules:
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = getattr(gm, node.target)
                if isinstance(value, torch.Tensor):
                    assert id(value) in own_ids | own_buffers, node.target
    with torch.no_grad():
        assert torch.equal(pg(**inputs).logits, model(**inputs).logits)
