"""The graph cache across processes: concurrent writers extract once (with and without locks),
and a writer killed with SIGKILL halfway through a write leaves nothing valid-looking.

Oracles: files on disk and their sha256, the digests of the outputs each process computed,
extraction counts."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from graphpatch_cache import cache_key, load_cached

from store_files import blobs, cache_warnings, files_under, logits, reaped, refs, sha256_file, store

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]  # child processes import transformers and extract

TESTS_DIR = str(Path(__file__).resolve().parents[1])
HELPERS_DIR = str(Path(TESTS_DIR) / "helpers")  # tiny_models, for the child processes


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
    from tiny_models import tiny_gpt2, token_inputs
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
                pg = load_cached(model, store=store, **inputs)
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
).format(tests=HELPERS_DIR)


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
    pg = load_cached(model, store=store(root, False), **inputs)
    assert pg.cache_stats.hits == 1 and torch.equal(logits(pg, inputs), expected)


# ------------------------------------------------------------------------------------------------
# 3. a writer killed with SIGKILL halfway through a write

KILLED_SCRIPT = textwrap.dedent(
    """
    import builtins, os, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    from tiny_models import tiny_gpt2, token_inputs
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
    load_cached(model, store=CacheStore(root, local_dir=False), **token_inputs())
    print("NOT STALLED", flush=True)
    """
).format(tests=HELPERS_DIR)


@pytest.mark.parametrize("stall_at", [0, 1], ids=["in-blob-write", "in-ref-write"])
def test_sigkill_mid_write_leaves_nothing_valid_looking(m1, tmp_path, stall_at):
    model, inputs, expected, *_ = m1
    root = tmp_path / "root"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(stall_at)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_subprocess_env(tmp_path), cwd=TESTS_DIR)
    with reaped(proc):
        line = proc.stdout.readline()
        assert line.startswith("STALLED"), (line, proc.stderr.read() if proc.poll() is not None else "")
        _, partial_name, full_len = line.split()
        partial = Path(partial_name)
        assert partial.parent == root / "tmp"
        assert partial.stat().st_size == int(full_len) // 2  # really half-written
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
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
        pg = load_cached(model, store=s, **inputs)
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
