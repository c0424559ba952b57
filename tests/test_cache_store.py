"""The graph cache (CacheStore + load_cached) on tiny GPT-2s.

Oracles are independent of the library where possible: bytes and sha256 of files on disk,
the unwrapped model's own output (torch.equal), extraction counts, and separate processes.
One in-process extraction primes a root (module fixture) that tests copy, so most tests do
not extract at all.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import graphpatch_cache._files as files_mod
from graphpatch_cache import PatchableGraph, ProbePatch, ZeroPatch, cache_key, load_cached
from graphpatch_cache.cache import CacheStore
from graphpatch_cache.cache.store import parse_duration, parse_size
from graphpatch_cache.errors import ArtifactFormatError, CacheError, CacheMissError, ModelStructureError

from conftest import tiny_gpt2, token_inputs

TESTS_DIR = str(Path(__file__).resolve().parent)
MUL3 = "transformer.h_0.mlp.act.mul_3"  # NewGELU's output in block 0


# ------------------------------------------------------------------------------------------------
# helpers


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def blobs(root: Path) -> list:
    objects = Path(root) / "objects"
    return sorted(p for p in objects.glob("*/*") if p.is_file()) if objects.is_dir() else []


def refs(root: Path) -> list:
    folder = Path(root) / "refs"
    return sorted(folder.glob("*/*.json")) if folder.is_dir() else []


def files_under(path: Path) -> list:
    path = Path(path)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []


def logits(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return module(**inputs).logits


def cache_warnings(record) -> list:
    return [w for w in record if "graphpatch_cache" in str(w.message)]


def store(root: Path, local=None, **kw) -> CacheStore:
    """A store whose local tier is ``local`` (a path), or disabled (``False``)."""
    return CacheStore(root, local_dir=local, **kw)


@pytest.fixture(scope="module")
def m1(tmp_path_factory):
    """(model, inputs, expected logits, primed root, primed local dir, fresh PatchableGraph).

    The primed root holds the one entry that ``load_cached(model, **inputs)`` stores."""
    base = tmp_path_factory.mktemp("primed")
    model = tiny_gpt2(n_layer=1)
    inputs = token_inputs()
    expected = logits(model, inputs)
    pg = load_cached(model, cache=store(base / "root", base / "local"), **inputs)
    assert pg.cache_stats.misses == 1 and pg.cache_stats.hits == 0
    fresh = PatchableGraph(model, **inputs)
    return model, inputs, expected, base / "root", base / "local", fresh


@pytest.fixture
def primed(m1, tmp_path):
    """A copy of the primed root (and its local tier) under tmp_path."""
    shutil.copytree(m1[3], tmp_path / "root")
    shutil.copytree(m1[4], tmp_path / "local")
    return tmp_path / "root", tmp_path / "local"


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
    pg = load_cached(model, cache=store(root, local_dir if local == "local" else False), **inputs)
    assert (pg.cache_stats.hits, pg.cache_stats.misses, pg.cache_stats.write_failures) == (1, 0, 0)
    assert torch.equal(logits(pg, inputs), expected)
    assert repr(pg.graph) == repr(fresh.graph)
    assert sorted(pg.graph._np_index) == sorted(fresh.graph._np_index)
    assert pg.artifact.to_json() == fresh.artifact.to_json()


def test_hit_patches_like_a_fresh_graph_and_like_a_hook(m1, primed):
    model, inputs, expected, _, _, fresh = m1
    pg = load_cached(model, cache=store(*primed), **inputs)
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
# 2. concurrency (separate processes)

CONCURRENT_SCRIPT = textwrap.dedent(
    """
    # A launcher process imports everything and builds the model once, then forks N workers
    # (separate processes: own memory, own fds, own CacheStore and file locks) that all call
    # load_cached on the same root at the same moment. Forking keeps 8 workers affordable on
    # 2 cores: importing transformers' GPT-2 costs seconds of CPU per interpreter.
    import hashlib, json, os, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from conftest import tiny_gpt2, token_inputs
    from graphpatch_cache import CacheStore, load_cached
    import graphpatch_cache.extraction  # noqa: F401

    root, local_base, results, n, locking = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
    digest = lambda t: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()
    model = tiny_gpt2(n_layer=1, seed=0)
    inputs = token_inputs()
    go_r, go_w = os.pipe()
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.read(go_r, 1)  # returns when the launcher closes its end: all start together
            try:
                store = CacheStore(root, local_dir=f"{{local_base}}-{{i}}", locking=locking)
                pg = load_cached(model, cache=store, **inputs)
                with torch.no_grad():
                    out, own = digest(pg(**inputs).logits), digest(model(**inputs).logits)
                s = pg.cache_stats
                res = {{"pid": os.getpid(), "misses": s.misses, "hits": s.hits, "failures": s.write_failures,
                        "out": out, "own": own}}
            except BaseException as exc:
                res = {{"error": repr(exc)}}
            with open(os.path.join(results, f"{{i}}.json"), "w") as f:
                json.dump(res, f)
            os._exit(0)
        pids.append(pid)
    os.close(go_r)
    os.close(go_w)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print(json.dumps(codes))
    """
).format(tests=TESTS_DIR)


def _subprocess_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["GRAPHPATCH_CACHE_DIR"] = str(tmp_path / "default-root-unused")
    env["GRAPHPATCH_CACHE_LOCAL_DIR"] = str(tmp_path / "default-local-unused")
    return env


def _run_concurrently(tmp_path: Path, root: Path, n: int, locking: bool) -> list:
    script = tmp_path / "launcher.py"
    script.write_text(CONCURRENT_SCRIPT)
    results = tmp_path / "results"
    results.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), str(root), str(tmp_path / "local"), str(results), str(n),
         "1" if locking else "0"],
        capture_output=True, text=True, env=_subprocess_env(tmp_path), cwd=TESTS_DIR, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [0] * n
    out = [json.loads((results / f"{i}.json").read_text()) for i in range(n)]
    assert not [r for r in out if "error" in r], out
    assert len({r["pid"] for r in out}) == n
    return out


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def test_concurrent_processes_extract_once(m1, tmp_path):
    model, inputs, expected, *_ = m1
    root = tmp_path / "root"
    results = _run_concurrently(tmp_path, root, 8, locking=True)
    assert sum(r["misses"] for r in results) == 1
    assert sum(r["hits"] for r in results) == 7
    assert all(r["failures"] == 0 for r in results)
    assert len({r["out"] for r in results}) == 1
    assert all(r["out"] == r["own"] for r in results)
    assert results[0]["out"] == _digest(expected)
    assert not files_under(root / "tmp")
    (blob,) = blobs(root)
    assert sha256_file(blob) == blob.name
    assert len(refs(root)) == 1
    assert store(root, False).verify() == []


def test_concurrent_processes_without_locks_are_still_correct(m1, tmp_path):
    model, inputs, expected, *_ = m1
    root = tmp_path / "root"
    results = _run_concurrently(tmp_path, root, 8, locking=False)
    assert sum(r["misses"] for r in results) >= 1
    assert all(r["misses"] + r["hits"] == 1 for r in results)
    assert all(r["failures"] == 0 for r in results)
    assert len({r["out"] for r in results}) == 1
    assert all(r["out"] == r["own"] for r in results)
    assert results[0]["out"] == _digest(expected)
    assert not files_under(root / "tmp")
    (blob,) = blobs(root)  # every writer wrote the same bytes under the same name
    assert sha256_file(blob) == blob.name
    assert len(refs(root)) == 1
    assert store(root, False).verify() == []
    pg = load_cached(model, cache=store(root, False), **inputs)
    assert pg.cache_stats.hits == 1 and torch.equal(logits(pg, inputs), expected)


# ------------------------------------------------------------------------------------------------
# 3. a writer killed with SIGKILL halfway through a write

KILLED_SCRIPT = textwrap.dedent(
    """
    import builtins, os, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import tiny_gpt2, token_inputs
    from graphpatch_cache import CacheStore, load_cached
    import graphpatch_cache._files as files_mod

    root, stall_at = sys.argv[1], int(sys.argv[2])
    real_open, count = builtins.open, [0]

    class Stall:
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)
        def __getattr__(self, name):
            return getattr(self.f, name)
        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            os.fsync(self.f.fileno())
            print("STALLED", self.f.name, len(data), flush=True)
            time.sleep(600)

    def stalling_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and os.path.basename(os.path.dirname(str(path))) == "tmp":
            count[0] += 1
            if count[0] - 1 == stall_at:
                return Stall(f)
        return f

    files_mod.open = stalling_open
    model = tiny_gpt2(n_layer=1, seed=0)
    load_cached(model, cache=CacheStore(root, local_dir=False), **token_inputs())
    print("NOT STALLED", flush=True)
    """
).format(tests=TESTS_DIR)


@pytest.mark.parametrize("stall_at", [0, 1], ids=["in-blob-write", "in-ref-write"])
def test_sigkill_mid_write_leaves_nothing_valid_looking(m1, tmp_path, stall_at):
    model, inputs, expected, *_ = m1
    root = tmp_path / "root"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(stall_at)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_subprocess_env(tmp_path), cwd=TESTS_DIR)
    try:
        line = proc.stdout.readline()
        assert line.startswith("STALLED"), (line, proc.stderr.read() if proc.poll() is not None else "")
        _, partial_name, full_len = line.split()
        partial = Path(partial_name)
        assert partial.parent == root / "tmp"
        assert partial.stat().st_size == int(full_len) // 2  # really half-written
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert partial.exists()  # the crash left its temp file behind ...
    assert not refs(root)  # ... but published no ref
    for blob in blobs(root):  # and any blob it published is whole
        assert sha256_file(blob) == blob.name
    assert len(blobs(root)) == stall_at
    s = store(root, tmp_path / "local", lock_timeout=120)
    assert s.entries() == [] and not s.contains(cache_key(model, **inputs))
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, cache=s, **inputs)
    assert time.monotonic() - started < 60  # the dead writer's lock did not hold us up
    assert not cache_warnings(record)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 0)
    assert torch.equal(logits(pg, inputs), expected)
    assert s.verify() == []
    assert len(s.entries()) == 1
    # gc removes temp files abandoned for more than a day, and keeps fresh ones
    fresh_tmp = root / "tmp" / "in-progress.tmp"
    fresh_tmp.write_bytes(b"x")
    old = time.time() - 2 * 86400
    os.utime(partial, (old, old))
    s.gc()
    assert not partial.exists() and fresh_tmp.exists()
    assert len(s.entries()) == 1


# ------------------------------------------------------------------------------------------------
# 4. corruption


def _corrupt(path: Path, how: str) -> bytes:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    return bytes(data)


def _local_value_files(local: Path) -> list:
    return sorted(local.rglob("*.val"))


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("local", ["no-local", "local-corrupt-too"])
def test_corrupt_blob_is_quarantined_warned_and_rebuilt(m1, primed, how, local):
    model, inputs, expected, *_ = m1
    root, local_dir = primed
    (blob,) = blobs(root)
    good = blob.read_bytes()
    bad = _corrupt(blob, how)
    if local == "local-corrupt-too":
        (val,) = _local_value_files(local_dir)
        assert val.read_bytes() == good
        _corrupt(val, how)
    s = store(root, local_dir if local != "no-local" else False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, cache=s, **inputs)
    found = cache_warnings(record)
    assert len(found) == 1, [str(w.message) for w in found]
    assert str(blob) in str(found[0].message) and "digest" in str(found[0].message)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 0)
    assert torch.equal(logits(pg, inputs), expected)
    quarantined = files_under(root / "quarantine")
    assert [q.read_bytes() for q in quarantined] == [bad]
    assert blob.read_bytes() == good  # rebuilt in place
    assert s.verify() == []
    again = load_cached(model, cache=store(root, False), **inputs)
    assert again.cache_stats.hits == 1


def test_corrupt_local_copy_is_dropped_and_the_shared_blob_used(m1, primed):
    model, inputs, expected, *_ = m1
    root, local_dir = primed
    (blob,) = blobs(root)
    (val,) = _local_value_files(local_dir)
    _corrupt(val, "flip")
    s = store(root, local_dir)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, cache=s, **inputs)
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
    pg = load_cached(model, cache=s, **inputs)
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
    pg = load_cached(model, cache=store(root, False), **inputs)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 0)
    assert torch.equal(logits(pg, inputs), expected)


def test_malformed_ref_is_quarantined_and_a_miss(m1, primed):
    model, inputs, expected, *_ = m1
    root, _ = primed
    (ref,) = refs(root)
    ref.write_bytes(b'{"digest": ')
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, cache=store(root, False), **inputs)
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
        load_cached(model, cache=store(root, local_dir if local == "local" else False), **inputs)
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
        pgs = [load_cached(model, cache=make_store(), **inputs) for _ in range(2)]
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
    ignores modes) a read-only bind mount of it, which stops root too."""
    model, inputs, expected, *_ = m1
    root = tmp_path / "ro"
    root.mkdir()
    os.chmod(root, 0o555)
    mounted = False
    try:
        if _writable(root):
            mount = subprocess.run(f"mount --bind {root} {root} && mount -o remount,bind,ro {root}", shell=True,
                                   capture_output=True, text=True)
            mounted = mount.returncode == 0
            if not mounted or _writable(root):
                pytest.skip(f"neither chmod nor a read-only bind mount stops this user from writing: {mount.stderr}")
        message = _two_loads(model, inputs, expected, lambda: store(root, tmp_path / "local"))
        assert str(root) in message
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=True)
        os.chmod(root, 0o755)


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


def _refuse(self, dest, data):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dest))


def test_read_only_filesystem_is_one_warning(m1, tmp_path, monkeypatch):
    model, inputs, expected, *_ = m1
    root = tmp_path / "root"
    monkeypatch.setattr(CacheStore, "_atomic_write", _refuse)
    message = _two_loads(model, inputs, expected, lambda: store(root, tmp_path / "local"))
    assert str(root) in message and os.strerror(errno.EROFS) in message


def test_read_only_root_still_serves_hits(m1, primed, monkeypatch):
    model, inputs, expected, *_ = m1
    root, _ = primed
    monkeypatch.setattr(CacheStore, "_atomic_write", _refuse)
    before = {p: p.read_bytes() for p in files_under(root)}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, cache=store(root, False), **inputs)
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
        pg = load_cached(model, cache=store(root, False, lock_timeout=0.5), **inputs)
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
    pg = load_cached(model, cache=store(root, tmp_path / "local"), **inputs)
    assert pg.cache_stats.misses == 1
    (blob,) = blobs(root)
    good = blob.read_bytes()
    _corrupt(blob, "flip")
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
    """The local copy is verified by its digest, so serving it is correct."""
    model, inputs, expected, *_ = m1
    root, local_dir = primed
    shutil.rmtree(root / "objects")
    pg = load_cached(model, cache=store(root, local_dir), **inputs)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (0, 1)
    assert torch.equal(logits(pg, inputs), expected)
    # without the local tier it is a miss, and the rebuild restores the shared blob
    pg = load_cached(model, cache=store(root, False), **inputs)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 0)
    (blob,) = blobs(root)
    assert sha256_file(blob) == blob.name


def test_deleting_the_local_dir_between_calls_is_harmless(m1, primed):
    model, inputs, expected, *_ = m1
    root, local_dir = primed
    s = store(root, local_dir)
    pg = load_cached(model, cache=s, **inputs)
    assert pg.cache_stats.hits == 1
    shutil.rmtree(local_dir)
    pg = load_cached(model, cache=s, **inputs)  # same store object, its diskcache deleted under it
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (0, 1)
    assert torch.equal(logits(pg, inputs), expected)
    shutil.rmtree(local_dir, ignore_errors=True)
    s2 = store(root, local_dir)  # a new store object
    pg = load_cached(model, cache=s2, **inputs)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (0, 1)
    assert torch.equal(logits(pg, inputs), expected)
    (blob,) = blobs(root)
    assert s2.local.get_blob(blob.name) == blob.read_bytes()  # re-memoized
    assert not (root / "quarantine").exists()


@pytest.mark.parametrize("where", ["inside", "same"])
def test_local_dir_inside_root_is_refused(tmp_path, where):
    root = tmp_path / "root"
    local = root / "local" if where == "inside" else root
    with pytest.raises(CacheError) as info:
        CacheStore(root, local_dir=local)
    assert str(local) in str(info.value)
    assert not root.exists()


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
    pg = load_cached(model, cache=s, **inputs)
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
    bad = _corrupt(blob, "flip")
    (problem,) = s.verify()
    assert problem.path == str(blob) and problem.key == ref.parent.name
    assert "digest" in problem.message
    assert blob.read_bytes() == bad and ref.exists()  # without fix nothing moves
    ref_bytes = ref.read_bytes()
    (problem,) = s.verify(fix=True)
    assert not blob.exists() and not ref.exists()
    assert sorted(q.read_bytes() for q in files_under(root / "quarantine")) == sorted([bad, ref_bytes])
    assert s.verify() == [] and s.entries() == []
    pg = load_cached(model, cache=s, **inputs)
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
    pg = load_cached(model, cache=s, **inputs)
    assert pg.cache_stats.hits == 1 and torch.equal(logits(pg, inputs), expected)
    assert s.gc(max_bytes=0).removed == [f"{real.key}/{real.variant}"]
    assert not blobs(root) and not refs(root)


def test_parse_duration_and_size():
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("90m") == 90 * 60
    assert parse_duration("45s") == 45
    assert parse_duration("45") == 45
    assert parse_duration("2w") == 14 * 86400
    assert parse_duration("1.5h") == 5400
    assert parse_duration(5) == 5.0
    for bad in ("", "d", "-1d", "3y", "1 day"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert parse_size("1024") == 1024
    assert parse_size(1024) == 1024
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("500MiB") == 500 * 1024**2
    assert parse_size("10k") == 10 * 1024
    assert parse_size("1.5KiB") == 1536
    assert parse_size("5GB") in (5 * 10**9, 5 * 1024**3)
    assert parse_size("500MB") in (500 * 10**6, 500 * 1024**2)
    assert parse_size("1TB") in (10**12, 1024**4)
    for bad in ("", "GB", "-1GB", "5 XB", "five"):
        with pytest.raises(ValueError):
            parse_size(bad)


# ------------------------------------------------------------------------------------------------
# 11. graph variants


def test_a_second_signature_is_stored_under_its_own_key(m1, primed):
    model, inputs, expected, *_ = m1
    root, local_dir = primed
    masked = token_inputs(mask=True)
    s = store(root, local_dir)
    pg = load_cached(model, cache=s, **inputs)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (0, 1)
    assert torch.equal(logits(pg, masked), logits(model, masked))
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 1)
    assert len(pg.variants) == 2
    key_masked = cache_key(model, **masked)
    assert key_masked != cache_key(model, **inputs)
    assert set(pg.cache_stats.keys) == {cache_key(model, **inputs), key_masked}
    assert sorted(e.key for e in s.entries()) == sorted({cache_key(model, **inputs), key_masked})
    assert len(blobs(root)) == 2 and s.verify() == []
    again = load_cached(model, cache=store(root, False), **masked)
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
    first = load_cached(model, cache=store(root, tmp_path / "local"), **inputs)
    assert first.cache_stats.misses == 1
    del first
    before = _rss()
    pg = load_cached(model, cache=store(root, tmp_path / "local"), **inputs)
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
