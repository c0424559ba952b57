"""The graph store (CacheStore) on hand-built artifacts: no model, no extraction, no dynamo.

Oracles are the files on disk: a blob is named by the sha256 of its bytes and holds exactly
``artifact.to_json()``; a ref is JSON naming its blob; what ``get`` returns serializes to the
bytes that were put. ``tests/integration/test_cache_store*.py`` check the same store behind
``load_cached`` on extracted models."""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import pytest

from graphpatch_cache.errors import CacheError

from hand_built import scaling_artifact
from store_files import blobs, files_under, refs, sha256_file, store

KEY_A = "a" * 64
KEY_B = "0123456789abcdef" * 4


def _snapshot(root) -> dict:
    return {str(p): sha256_file(p) for p in files_under(root)}


def test_put_writes_the_json_bytes_under_their_sha256_and_a_ref_naming_them(tmp_path):
    artifact = scaling_artifact()
    s = store(tmp_path / "root", False)
    s.put(KEY_A, artifact)
    data = artifact.to_json().encode()
    digest = hashlib.sha256(data).hexdigest()
    (blob,) = blobs(tmp_path / "root")
    assert blob.name == digest and blob.parent.name == digest[:2] and blob.read_bytes() == data
    (ref,) = refs(tmp_path / "root")
    assert ref.parent.name == KEY_A
    meta = json.loads(ref.read_bytes())
    assert meta["digest"] == digest and meta["size"] == len(data) and meta["signature"] == artifact.signature
    assert s.contains(KEY_A) and not s.contains(KEY_B)
    assert s.get(KEY_A).to_json() == artifact.to_json()
    assert s.get(KEY_B) is None
    assert s.keys() == [KEY_A] and s.resolve("aaaa") == KEY_A


def test_signatures_are_variants_of_a_key_and_equal_bytes_are_one_blob(tmp_path):
    f32, f64 = scaling_artifact(dtype="float32"), scaling_artifact(dtype="float64")
    s = store(tmp_path / "root", False)
    s.put(KEY_A, f32)
    s.put(KEY_A, f64)
    s.put(KEY_B, f32)
    assert len(refs(tmp_path / "root")) == 3
    assert {b.name for b in blobs(tmp_path / "root")} == {hashlib.sha256(a.to_json().encode()).hexdigest()
                                                         for a in (f32, f64)}
    assert s.get(KEY_A, f64.signature).to_json() == f64.to_json()
    assert s.get(KEY_A, f32.signature).to_json() == f32.to_json()
    assert len(s.variants(KEY_A)) == 2 and len(s.entries()) == 3


def test_remove_keeps_the_blob_another_key_names(tmp_path):
    f32, f64 = scaling_artifact(dtype="float32"), scaling_artifact(dtype="float64")
    s = store(tmp_path / "root", False)
    s.put(KEY_A, f32)
    s.put(KEY_A, f64)
    s.put(KEY_B, f32)
    assert s.remove(KEY_A) == 2
    assert [r.parent.name for r in refs(tmp_path / "root")] == [KEY_B]
    assert [b.name for b in blobs(tmp_path / "root")] == [hashlib.sha256(f32.to_json().encode()).hexdigest()]
    assert s.get(KEY_B).to_json() == f32.to_json() and s.get(KEY_A) is None


def test_a_flipped_byte_is_reported_then_quarantined_and_never_served(tmp_path):
    artifact = scaling_artifact()
    s = store(tmp_path / "root", False)
    s.put(KEY_A, artifact)
    (blob,) = blobs(tmp_path / "root")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    before = _snapshot(tmp_path / "root")
    assert "corrupt-blob" in [p.kind for p in s.verify()]
    assert _snapshot(tmp_path / "root") == before  # verify without fix changes nothing
    s.verify(fix=True)
    assert blobs(tmp_path / "root") == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert s.get(KEY_A) is None


def test_gc_removes_the_oldest_entries_first_down_to_max_bytes(tmp_path):
    old, new = scaling_artifact(factor=2), scaling_artifact(factor=3)
    s = store(tmp_path / "root", False)
    s.put(KEY_A, old)
    s.put(KEY_B, new)
    ref_a = next(r for r in refs(tmp_path / "root") if r.parent.name == KEY_A)
    meta = json.loads(ref_a.read_bytes())
    meta["created"] -= 3600
    ref_a.write_text(json.dumps(meta))
    report = s.gc(max_bytes=len(new.to_json().encode()))
    assert [r.split("/")[0] for r in report.removed] == [KEY_A]
    assert [r.parent.name for r in refs(tmp_path / "root")] == [KEY_B]
    assert [b.name for b in blobs(tmp_path / "root")] == [hashlib.sha256(new.to_json().encode()).hexdigest()]
    assert s.get(KEY_B).to_json() == new.to_json()


def test_the_local_tier_serves_a_blob_the_shared_root_lost(tmp_path):
    artifact = scaling_artifact()
    s = store(tmp_path / "root", tmp_path / "local")
    s.put(KEY_A, artifact)
    (blob,) = blobs(tmp_path / "root")
    os.unlink(blob)
    assert s.get(KEY_A).to_json() == artifact.to_json()


@pytest.mark.parametrize("key", ["abc", "A" * 64, "g" * 64, "a" * 63, "", "../" + "a" * 61])
def test_keys_are_64_lowercase_hex_digits(tmp_path, key):
    s = store(tmp_path / "root", False)
    with pytest.raises(CacheError):
        s.put(key, scaling_artifact())
    assert refs(tmp_path / "root") == [] and blobs(tmp_path / "root") == []
