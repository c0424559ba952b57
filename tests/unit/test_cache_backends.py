"""The store on its root backends, with hand-built artifacts (no extraction): a directory, a
``file://`` URL (the same directory backend), and an fsspec URL (``memory://``, the fsspec
backend that S3 uses too; ``tests/integration/test_cache_s3.py`` runs it against a real S3
server). Oracles: the bytes under the root's names, their sha256."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
import warnings

import pytest

from graphpatch_cache.cache import CacheStore, sync
from graphpatch_cache.cache.backend import PosixRoot, open_root
from graphpatch_cache.cache.settings import default_root
from graphpatch_cache.errors import RemoteStoreError

from hand_built import scaling_artifact
from store_files import blobs, refs

fsspec = pytest.importorskip("fsspec")

KEY_A = "a" * 64
KEY_B = "0123456789abcdef" * 4


@pytest.fixture
def memory_url():
    """A fresh prefix of fsspec's in-memory filesystem (one per process), removed afterwards."""
    path = f"/gpc-{uuid.uuid4().hex[:12]}"
    yield f"memory://{path}"
    fs = fsspec.filesystem("memory")
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _names(url: str) -> dict:
    """``{name under the root: bytes}``, read through fsspec, not through the store."""
    fs = fsspec.filesystem("memory")
    base = url[len("memory://"):]
    return {p[len(base) + 1:]: fs.cat_file(p) for p in fs.find(base)}


def test_put_on_memory_writes_the_directory_layout_and_reads_back(memory_url):
    artifact = scaling_artifact()
    s = CacheStore(memory_url, local_dir=False)
    assert s.backend.remote and s.root == memory_url
    entry = s.put(KEY_A, artifact)
    data = artifact.to_json().encode()
    digest = hashlib.sha256(data).hexdigest()
    files = _names(memory_url)
    assert files[f"objects/{digest[:2]}/{digest}"] == data
    ref = json.loads(files[f"refs/{KEY_A}/{entry.variant}.json"])
    assert ref["digest"] == digest and ref["size"] == len(data)
    assert entry.ref_path == f"{memory_url}/refs/{KEY_A}/{entry.variant}.json"
    assert s.keys() == [KEY_A] and s.contains(KEY_A) and not s.contains(KEY_B)
    assert s.get(KEY_A).to_json() == artifact.to_json()
    assert [e.digest for e in CacheStore(memory_url, local_dir=False).entries()] == [digest]


def test_a_blob_is_created_once_and_a_damaged_one_is_rewritten(memory_url):
    s = CacheStore(memory_url, local_dir=False)
    assert s.backend.conditional  # fsspec's pipe_file(mode="create") on this backend
    assert s.backend.create("objects/x", b"first") is True
    assert s.backend.create("objects/x", b"second") is False
    assert _names(memory_url)["objects/x"] == b"first"
    artifact = scaling_artifact()
    s.put(KEY_A, artifact)
    ((name, data),) = [(n, d) for n, d in _names(memory_url).items() if n.startswith("objects/") and n != "objects/x"]
    fsspec.filesystem("memory").pipe_file(f"{memory_url[len('memory://'):]}/{name}", data[:10])
    s.put(KEY_B, artifact)  # same bytes: the damaged blob is found and rewritten
    assert _names(memory_url)[name] == data


def test_a_backend_without_conditional_writes_checks_then_writes(memory_url):
    """Last writer wins there, harmlessly: a blob's name is the sha256 of its bytes."""
    from fsspec.implementations.memory import MemoryFileSystem

    class NoExclusiveWrites(MemoryFileSystem):  # a backend as fsspec had them before exclusive writes
        protocol = ("nocreate",)

        def pipe_file(self, path, value, mode="overwrite", **kwargs):
            if mode != "overwrite":
                raise NotImplementedError("exclusive write")
            return super().pipe_file(path, value, **kwargs)

    fsspec.register_implementation("nocreate", NoExclusiveWrites, clobber=True)
    url = memory_url.replace("memory://", "nocreate://")
    s = CacheStore(url, local_dir=False)
    artifact = scaling_artifact()
    s.put(KEY_A, artifact)
    assert not s.backend.conditional
    assert s.backend.create("objects/x", b"first") is True and s.backend.create("objects/x", b"second") is False
    assert s.get(KEY_A).to_json() == artifact.to_json() and s.keys() == [KEY_A]


def test_verify_fix_gc_and_remove_on_memory(memory_url):
    old, new = scaling_artifact(factor=2), scaling_artifact(factor=3)
    s = CacheStore(memory_url, local_dir=False)
    s.put(KEY_A, old)
    s.put(KEY_B, new)
    digest_old = hashlib.sha256(old.to_json().encode()).hexdigest()
    fs = fsspec.filesystem("memory")
    base = memory_url[len("memory://"):]
    fs.pipe_file(f"{base}/objects/{digest_old[:2]}/{digest_old}", b"{}")
    before = _names(memory_url)
    assert "corrupt-blob" in [p.kind for p in s.verify()]
    assert _names(memory_url) == before  # verify without fix changes nothing
    s.verify(fix=True)
    files = _names(memory_url)
    assert not any(n.startswith(f"refs/{KEY_A}") for n in files) and f"objects/{digest_old[:2]}/{digest_old}" not in files
    # the corrupt blob and its ref; KEY_B's ref too, as verify --fix does with unproven refs (hand-built
    # entries record no key material)
    assert {n.split(".")[0] for n in files if n.startswith("quarantine/")} == {
        f"quarantine/{digest_old}", f"quarantine/{KEY_A}", f"quarantine/{KEY_B}"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert s.get(KEY_A) is None
    s.put(KEY_A, old)
    s.put(KEY_B, new)
    assert s.remove(KEY_A) == 1 and s.keys() == [KEY_B]
    report = s.gc(max_bytes=0)
    assert [r.split("/")[0] for r in report.removed] == [KEY_B]
    assert not [n for n in _names(memory_url) if n.startswith(("objects/", "refs/"))]


def test_the_loader_reads_remembered_refs_by_name_and_lists_on_its_second_lookup(memory_url, tmp_path):
    """A warm lookup GETs the refs the local tier remembers (no listing); the loader's second
    lookup (after a miss, before extracting) lists, and finds a variant added meanwhile."""
    f32, f64 = scaling_artifact(dtype="float32"), scaling_artifact(dtype="float64")
    first = CacheStore(memory_url, local_dir=tmp_path / "local")
    first.put(KEY_A, f32)
    assert [e.signature for e in first.variants(KEY_A, repair=True)] == [f32.signature]  # remembered
    CacheStore(memory_url, local_dir=False).put(KEY_A, f64)  # another machine adds a variant
    warm = CacheStore(memory_url, local_dir=tmp_path / "local")
    assert [e.signature for e in warm.variants(KEY_A, repair=True)] == [f32.signature]
    assert sorted(e.digest for e in warm.variants(KEY_A, repair=True)) == sorted(
        hashlib.sha256(a.to_json().encode()).hexdigest() for a in (f32, f64))
    # each remembered ref is read from the root: one removed there is not served
    CacheStore(memory_url, local_dir=False).remove(KEY_A)
    CacheStore(memory_url, local_dir=False).put(KEY_A, f64)
    again = CacheStore(memory_url, local_dir=tmp_path / "local")
    assert [e.signature for e in again.variants(KEY_A, repair=True)] == [f64.signature]


def test_a_file_url_is_the_directory_root(tmp_path):
    """``file://`` is the directory backend: atomic renames, the same files as a plain path."""
    artifact = scaling_artifact()
    s = CacheStore(f"file://{tmp_path}/root", local_dir=False)
    assert isinstance(s.backend, PosixRoot) and s.root == tmp_path / "root"
    s.put(KEY_A, artifact)
    (blob,) = blobs(tmp_path / "root")
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    assert len(refs(tmp_path / "root")) == 1
    assert CacheStore(tmp_path / "root", local_dir=False).get(KEY_A).to_json() == artifact.to_json()


def test_sync_between_a_directory_and_memory_both_ways(tmp_path, memory_url):
    f32, f64 = scaling_artifact(dtype="float32"), scaling_artifact(dtype="float64")
    here = CacheStore(tmp_path / "root", local_dir=False)
    here.put(KEY_A, f32)
    here.put(KEY_A, f64)
    there = CacheStore(memory_url, local_dir=False)
    report = sync(here, there)
    assert len(report.copied) == 2 and not report.skipped and not report.problems
    on_disk = {str(p.relative_to(tmp_path / "root")): p.read_bytes()
               for p in blobs(tmp_path / "root") + refs(tmp_path / "root")}
    assert _names(memory_url) == on_disk  # the same names, byte for byte
    again = sync(here, there)
    assert again.copied == [] and len(again.skipped) == 2
    back = CacheStore(tmp_path / "back", local_dir=False)
    assert len(sync(there, back, [KEY_A]).copied) == 2
    assert {str(p.relative_to(tmp_path / "back")): p.read_bytes()
            for p in blobs(tmp_path / "back") + refs(tmp_path / "back")} == on_disk
    # a damaged source blob is reported, never copied
    digest = hashlib.sha256(f64.to_json().encode()).hexdigest()
    fsspec.filesystem("memory").pipe_file(f"{memory_url[len('memory://'):]}/objects/{digest[:2]}/{digest}", b"x")
    report = sync(there, CacheStore(tmp_path / "third", local_dir=False))
    assert len(report.copied) == 1 and [p.kind for p in report.problems] == ["corrupt-blob"]
    assert not (tmp_path / "third" / "objects" / digest[:2] / digest).exists()


def test_a_scheme_without_its_package_names_what_to_install():
    missing = next((p for p in ("gs", "az") if not _installed(p)), None)
    if missing is None:
        pytest.skip("gcsfs and adlfs are both installed: no scheme lacks its package here")
    with pytest.raises(RemoteStoreError) as info:
        CacheStore(f"{missing}://bucket/prefix", local_dir=False)
    assert "pip install" in info.value.hint and ("gcsfs" in info.value.hint or "adlfs" in info.value.hint)
    with pytest.raises(RemoteStoreError, match="nosuchscheme"):
        CacheStore("nosuchscheme://bucket/prefix", local_dir=False)


def _installed(protocol: str) -> bool:
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError):
        return False
    return True


def test_storage_options_are_for_urls_and_the_environment_takes_a_url(tmp_path, monkeypatch, memory_url):
    with pytest.raises(TypeError, match="URL roots"):
        open_root(tmp_path, {"anon": True})
    monkeypatch.setenv("GRAPHPATCH_CACHE_DIR", memory_url)
    assert default_root() == memory_url  # kept as written: Path() would fold the "//"
    assert CacheStore(local_dir=False).root == memory_url


def test_the_command_line_takes_a_url_root(memory_url, tmp_path):
    from click.testing import CliRunner

    from cli_run import invoke

    CacheStore(memory_url, local_dir=False).put(KEY_A, scaling_artifact())
    runner = CliRunner(env={"GRAPHPATCH_CACHE_LOCAL_DIR": str(tmp_path / "local")})
    listed = json.loads(invoke(runner, "ls", "--cache-dir", memory_url, "--json").stdout)
    assert listed["root"] == memory_url and [e["key"] for e in listed["entries"]] == [KEY_A]
    out = json.loads(invoke(runner, "sync", memory_url, tmp_path / "copy", "--json").stdout)
    assert len(out["copied"]) == 1 and out["problems"] == []
    assert len(refs(tmp_path / "copy")) == 1


@pytest.mark.subprocess
def test_a_directory_root_imports_no_remote_filesystem(tmp_path):
    """fsspec, s3fs and botocore load only for a URL root (the command line's speed)."""
    env = {**os.environ, "GRAPHPATCH_CACHE_DIR": str(tmp_path / "root"),
           "GRAPHPATCH_CACHE_LOCAL_DIR": str(tmp_path / "local")}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "graphpatch_cache", "ls"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", proc.stderr, flags=re.M))
    assert "graphpatch_cache.cli.main" in imported
    assert not {m for m in imported if m.split(".")[0] in ("fsspec", "s3fs", "botocore", "aiobotocore")}
