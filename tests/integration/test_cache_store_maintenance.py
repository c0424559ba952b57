"""The graph cache's maintenance API on an entry load_cached stored for a tiny GPT-2: entries,
contains, remove, resolve, verify (and fix), gc.

Oracles: bytes and sha256 of files on disk, the unwrapped model's own output. The primed root
(``m1``, ``primed``: tests/integration/conftest.py) is copied, so tests do not extract."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch

from graphpatch_cache import cache_key, load_cached
from graphpatch_cache.errors import CacheError, CacheMissError

from store_files import blobs, corrupt, files_under, logits, refs, store

pytestmark = pytest.mark.slow  # m1 (integration conftest) extracts a GPT-2


# ------------------------------------------------------------------------------------------------
# 10. maintenance API


def test_entries_contains_remove(m1, primed):
    model, inputs, expected, _, _, fresh = m1
    root, _ = primed
    s = store(root, False)
    key = cache_key(model, **inputs)
    (blob,) = blobs(root)
    (entry,) = s.entries()
    assert entry.key == key
    assert entry.digest == blob.name
    assert entry.model_class == fresh.artifact.model_class
    assert entry.model_class.endswith("GPT2LMHeadModel")
    assert entry.size == blob.stat().st_size
    assert 0 < time.time() - entry.created < 3600
    assert entry.versions["torch"] == torch.__version__
    assert s.variants(key) == [entry]
    assert s.contains(key)
    assert not s.contains("0" * 64)
    with pytest.raises(CacheError):
        s.contains("not-a-key")
    assert s.remove(key) == 1
    assert not (root / "refs" / key).exists()
    assert not blob.exists()
    assert not s.contains(key) and s.entries() == []
    with pytest.raises(CacheMissError):
        s.remove(key)
    pg = load_cached(model, store=s, **inputs)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 0)


def test_remove_keeps_blobs_other_keys_share(m1, primed):
    root, _ = primed
    s = store(root, False)
    (entry,) = s.entries()
    other = "f" * 64 if entry.key[0] != "f" else "e" * 64
    s.put(other, m1[5].artifact)
    (blob,) = blobs(root)
    assert s.remove(entry.key) == 1
    assert blob.exists() and s.contains(other)


def test_resolve(m1, primed):
    root, _ = primed
    s = store(root, False)
    (entry,) = s.entries()
    key = entry.key
    assert s.resolve(key) == key
    assert s.resolve(key[:6]) == key
    assert s.resolve(key[:6].upper()) == key
    twin = key[:4] + ("0" if key[4] != "0" else "1") + "a" * 59
    s.put(twin, m1[5].artifact)
    assert s.resolve(key[:5]) == key
    assert s.resolve(twin[:5]) == twin
    with pytest.raises(CacheMissError, match="ambiguous"):
        s.resolve(key[:4])
    with pytest.raises(CacheMissError):
        s.resolve("g")
    with pytest.raises(CacheMissError):
        s.resolve("")
    with pytest.raises(CacheMissError):
        store(root.parent / "empty", False).resolve(key[:4])


def test_verify_finds_a_flipped_byte_and_fix_quarantines(m1, primed):
    model, inputs, expected, *_ = m1
    root, _ = primed
    s = store(root, False)
    assert s.verify() == []
    (blob,) = blobs(root)
    (ref,) = refs(root)
    bad = corrupt(blob, "flip")
    (problem,) = s.verify()
    assert problem.path == str(blob) and problem.key == ref.parent.name
    assert "digest" in problem.message
    assert blob.read_bytes() == bad and ref.exists()  # without fix nothing moves
    ref_bytes = ref.read_bytes()
    (problem,) = s.verify(fix=True)
    assert not blob.exists() and not ref.exists()
    assert sorted(q.read_bytes() for q in files_under(root / "quarantine")) == sorted([bad, ref_bytes])
    assert s.verify() == [] and s.entries() == []
    pg = load_cached(model, store=s, **inputs)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 0)
    assert torch.equal(logits(pg, inputs), expected)


def test_verify_reports_a_missing_blob(m1, primed):
    root, _ = primed
    s = store(root, False)
    (blob,) = blobs(root)
    blob.unlink()
    (problem,) = s.verify()
    assert problem.path == str(blob) and "missing" in problem.message


def _set_created(ref: Path, created: float) -> None:
    meta = json.loads(ref.read_bytes())
    meta["created"] = created
    ref.write_text(json.dumps(meta))


def test_gc_older_than_and_max_bytes(m1, primed):
    model, inputs, expected, _, _, fresh = m1
    root, _ = primed
    s = store(root, False)
    (real,) = s.entries()
    # two more entries with their own blobs (a changed model_class changes the bytes)
    old_key, mid_key = "a" * 64, "b" * 64
    old = s.put(old_key, dataclasses.replace(fresh.artifact, model_class="old.Model"))
    mid = s.put(mid_key, dataclasses.replace(fresh.artifact, model_class="mid.Model"))
    assert len({real.digest, old.digest, mid.digest}) == 3 and len(blobs(root)) == 3
    now = time.time()
    _set_created(Path(old.ref_path), now - 40 * 86400)
    _set_created(Path(mid.ref_path), now - 2 * 86400)
    _set_created(Path(real.ref_path), now - 60)
    before = {p: p.read_bytes() for p in files_under(root)}

    report = s.gc(older_than="30d", dry_run=True)
    assert report.dry_run and report.removed == [f"{old_key}/{old.variant}"]
    assert report.freed_bytes == old.size
    assert {p: p.read_bytes() for p in files_under(root)} == before

    report = s.gc(older_than="30d")
    assert report.removed == [f"{old_key}/{old.variant}"] and report.freed_bytes == old.size
    assert not Path(old.ref_path).exists()
    assert not (root / "objects" / old.digest[:2] / old.digest).exists()
    assert sorted(b.name for b in blobs(root)) == sorted([real.digest, mid.digest])
    assert report.kept_bytes == sum(b.stat().st_size for b in blobs(root))

    budget = real.size  # room for the newest entry only
    report = s.gc(max_bytes=budget, dry_run=True)
    assert report.removed == [f"{mid_key}/{mid.variant}"]
    assert len(blobs(root)) == 2
    report = s.gc(max_bytes=str(budget))
    assert report.removed == [f"{mid_key}/{mid.variant}"] and report.freed_bytes == mid.size
    assert [b.name for b in blobs(root)] == [real.digest]
    assert report.kept_bytes == real.size
    assert [e.key for e in s.entries()] == [real.key]
    assert s.gc(max_bytes="1GiB", older_than="1d").removed == []
    pg = load_cached(model, store=s, **inputs)
    assert pg.cache_stats.hits == 1 and torch.equal(logits(pg, inputs), expected)
    assert s.gc(max_bytes=0).removed == [f"{real.key}/{real.variant}"]
    assert not blobs(root) and not refs(root)
