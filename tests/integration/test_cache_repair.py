"""A shared blob that goes bad while this user's local tier holds a verified copy is noticed on
the next hit, reported once and repaired from the local copy; listing changes nothing on disk.

Oracles: sha256 of the bytes on the shared root, the unwrapped model's output (torch.equal),
warnings, and what ``verify`` (the read-only checker) reports afterwards."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from cli_run import invoke
from store_files import blobs, cache_warnings, corrupt, logits, read_only, refs, store

from graphpatch_cache import load_cached

pytestmark = pytest.mark.slow  # shares the m1 extraction with the cache-store files


def _load(m1, root, local):
    model, inputs, expected, *_ = m1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, store=store(root, local), **inputs)
    assert (pg.cache_stats.hits, pg.cache_stats.misses) == (1, 0)
    assert torch.equal(logits(pg, inputs), expected)
    return [str(w.message) for w in cache_warnings(record)]


def _intact(blob) -> bool:
    return hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


@pytest.mark.parametrize("damage", ["flip", "cut", "delete"])
def test_a_damaged_shared_blob_is_repaired_from_the_local_copy(m1, primed, damage):
    root, local = primed
    assert _load(m1, root, local) == []  # served from the local tier; the shared copy verified once
    (blob,) = blobs(root)
    if damage == "delete":
        blob.unlink()
    else:
        corrupt(blob, damage)
    (message,) = _load(m1, root, local)
    assert "repaired from your verified local copy" in message and str(blob) in message
    assert ("missing" if damage == "delete" else "corrupt") in message
    assert _intact(blob)
    assert _load(m1, root, local) == []  # once
    # a teammate without a local tier finds an intact entry
    assert _load(m1, root, False) == []
    assert not (root / "quarantine").exists()


def test_a_read_only_root_is_reported_and_still_served_locally(m1, primed):
    root, local = primed
    _load(m1, root, local)
    (blob,) = blobs(root)
    damaged = corrupt(blob, "flip")
    with read_only(root):
        (message,) = _load(m1, root, local)
    assert "could not be repaired" in message and str(blob) in message
    assert blob.read_bytes() == damaged


def test_ls_lists_without_quarantining_and_verify_then_sees_the_damage(m1, primed, runner):
    root, _ = primed
    (blob,) = blobs(root)
    (ref,) = refs(root)
    corrupt(blob, "flip")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    (row,) = json.loads(invoke(runner, "ls", "--json", "--cache-dir", root).stdout)["entries"]
    assert row["intact"] is False
    assert "(damaged)" in invoke(runner, "ls", "--cache-dir", root).stdout
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    out = json.loads(invoke(runner, "verify", "--json", "--cache-dir", root, code=1).stdout)
    assert [p["kind"] for p in out["problems"]] == ["corrupt-blob"]
