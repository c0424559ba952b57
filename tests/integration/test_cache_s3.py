"""The graph cache on object storage, against a real S3-protocol server (moto's standalone
server on 127.0.0.1, started once per session; no mock of our code).

Every store here reaches the server through ``AWS_ENDPOINT_URL_S3`` (the usual way, nothing
of ours to configure) pointed at a relay (``tests/helpers/s3_server.py``) that records each
HTTP request on the wire and can stall an upload halfway. Oracles: the model's own output
(``torch.equal``), the objects in the bucket and their sha256, the requests on the wire."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]' brings it): "
                                          "the object-storage tests need a real S3-protocol server")
pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[s3,dev]')")

from graphpatch_cache import cache_key, load_cached  # noqa: E402
from graphpatch_cache.cache import CacheStore, sync  # noqa: E402
from graphpatch_cache.errors import RemoteStoreError  # noqa: E402

from cli_run import invoke  # noqa: E402
from s3_server import Relay, aws_env, free_port, start_moto  # noqa: E402
from store_files import cache_warnings, logits, reaped, sha256_file  # noqa: E402
from store_files import blobs as local_blobs, refs as local_refs  # noqa: E402
from tiny_models import mlp_inputs, tiny_mlp  # noqa: E402

pytestmark = [pytest.mark.slow]

BUCKET = "graphs"
HELPERS_DIR = str(Path(__file__).resolve().parents[1] / "helpers")
TESTS_DIR = str(Path(__file__).resolve().parents[1])
REPO_ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="session")
def s3():
    """The server, a relay in front of it, a bucket, and the environment that points clients
    (this process's and children's) at the relay."""
    import s3fs

    server, endpoint = start_moto()
    relay = Relay("127.0.0.1", int(endpoint.rsplit(":", 1)[1]))
    with aws_env(relay.endpoint) as env:
        # the test's own view of the bucket goes straight to the server (not counted by the relay)
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield SimpleNamespace(endpoint=endpoint, relay=relay, fs=fs, env=env)
    relay.close()
    server.stop()


@pytest.fixture
def url(s3):
    """A fresh prefix of the bucket for one test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def _objects(s3, url: str, folder: str) -> dict:
    """``{name: bytes}`` of the objects under ``url/folder``, read directly from the server."""
    base = url[len("s3://"):]
    s3.fs.invalidate_cache()
    return {p[len(base) + 1:]: s3.fs.cat_file(p) for p in s3.fs.find(f"{base}/{folder}")}


def _assert_one_valid_entry(s3, url: str) -> str:
    blobs = _objects(s3, url, "objects")
    assert len(blobs) == 1
    ((name, data),) = blobs.items()
    assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[-1]
    refs = _objects(s3, url, "refs")
    assert len(refs) == 1 and json.loads(next(iter(refs.values())))["digest"] == name.rsplit("/", 1)[-1]
    assert CacheStore(url, local_dir=False).verify() == []
    return name


def _child_env(s3, tmp_path: Path) -> dict:
    env = dict(os.environ, **s3.env)
    # the children import this checkout's graphpatch_cache (what the test process imported)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, *filter(None, [env.get("PYTHONPATH")])])
    env["GRAPHPATCH_CACHE_LOCAL_DIR"] = str(tmp_path / "default-local-unused")
    return env


# ------------------------------------------------------------------------------------------------
# fresh processes: 8 concurrent builders, then a hit on a new machine, then a warm hit

LAUNCHER = textwrap.dedent(
    """
    # Imports once, builds the model once, then forks the workers of each step (own memory,
    # own CacheStore, own S3 connections: the parent never touches S3). Steps run one after
    # another; the test says when to start the next one (a line on stdin).
    import json, os, sys
    sys.path.insert(0, {helpers!r})
    import torch
    torch.set_num_threads(1)
    from tiny_models import tiny_mlp, mlp_inputs
    from graphpatch_cache import CacheStore, load_cached
    import graphpatch_cache.extraction  # noqa: F401

    url, out_dir, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model = tiny_mlp()
    inputs = mlp_inputs()
    for step in plan:
        sys.stdin.readline()
        go_r, go_w = os.pipe()
        pids = []
        for name, local in step:
            pid = os.fork()
            if pid == 0:
                os.close(go_w)
                os.read(go_r, 1)  # all workers of a step start together
                try:
                    pg = load_cached(model, store=CacheStore(url, local_dir=local), **inputs)
                    with torch.no_grad():
                        torch.save(pg(**inputs), os.path.join(out_dir, name + ".pt"))
                    s = pg.cache_stats
                    res = {{"pid": os.getpid(), "misses": s.misses, "hits": s.hits, "failures": s.write_failures}}
                except BaseException as exc:
                    res = {{"error": repr(exc)}}
                with open(os.path.join(out_dir, name + ".json"), "w") as f:
                    json.dump(res, f)
                os._exit(0)
            pids.append(pid)
        os.close(go_r)
        os.close(go_w)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        print(json.dumps(codes), flush=True)
    """
).format(helpers=HELPERS_DIR)


def _mlp():
    model, inputs = tiny_mlp(), mlp_inputs()
    with torch.no_grad():
        return model, inputs, model(**inputs)


@pytest.fixture(scope="module")
def processes(s3, tmp_path_factory):
    """Step 1: 8 processes build one key at once on an empty prefix (each its own local tier).
    Step 2: a process with a new local tier (a new machine). Step 3: a process with step 2's
    local tier. Returns the results and the requests each step sent."""
    base = tmp_path_factory.mktemp("s3-processes")
    url = f"s3://{BUCKET}/processes-{uuid.uuid4().hex[:8]}"
    plan = [[[f"builder{i}", str(base / f"local{i}")] for i in range(8)],
            [["new_machine", str(base / "local-new")]],
            [["warm", str(base / "local-new")]]]
    (base / "launcher.py").write_text(LAUNCHER)
    proc = subprocess.Popen([sys.executable, str(base / "launcher.py"), url, str(base), json.dumps(plan)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_child_env(s3, base), cwd=TESTS_DIR)
    requests = []
    with reaped(proc):
        for step in plan:
            s3.relay.reset()
            proc.stdin.write("\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            assert json.loads(line) == [0] * len(step), (line, proc.stderr.read() if proc.poll() is not None else "")
            requests.append(list(s3.relay.requests))
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]
    results = {}
    for step in plan:
        for name, _ in step:
            res = json.loads((base / f"{name}.json").read_text())
            assert "error" not in res, res
            res["out"] = torch.load(base / f"{name}.pt")
            results[name] = res
    return SimpleNamespace(url=url, results=results, requests=requests, expected=_mlp()[2])


@pytest.mark.subprocess
def test_eight_concurrent_builders_converge_to_one_valid_entry(s3, processes):
    builders = [processes.results[f"builder{i}"] for i in range(8)]
    assert len({r["pid"] for r in builders}) == 8
    assert sum(r["misses"] for r in builders) >= 1  # one or more extractions
    assert all(r["misses"] + r["hits"] == 1 and r["failures"] == 0 for r in builders)
    assert all(torch.equal(r["out"], processes.expected) for r in builders)
    name = _assert_one_valid_entry(s3, processes.url)
    # every extraction tried a conditional create of the blob; the bucket holds one object
    blob_puts = [r for r in processes.requests[0] if r.startswith("PUT ") and name in r]
    assert len(blob_puts) == sum(r["misses"] for r in builders)
    assert _objects(s3, processes.url, "quarantine") == {}


@pytest.mark.subprocess
def test_a_hit_in_a_fresh_process_reads_the_ref_and_takes_the_blob_from_the_local_tier(s3, processes):
    for step, name in ((1, "new_machine"), (2, "warm")):
        res = processes.results[name]
        assert (res["hits"], res["misses"], res["failures"]) == (1, 0, 0)
        assert torch.equal(res["out"], processes.expected)
    blob = _assert_one_valid_entry(s3, processes.url)
    new_machine, warm = processes.requests[1], processes.requests[2]
    prefix = f"/{BUCKET}/{processes.url.split('/', 3)[3]}"
    # a new machine: one listing of the key's refs, the ref, and the blob downloaded once
    assert len(new_machine) == 3 and new_machine[0].startswith(f"GET /{BUCKET}?list-type=2"), new_machine
    assert new_machine[1].startswith(f"GET {prefix}/refs/") and new_machine[2] == f"GET {prefix}/{blob}", new_machine
    # warm: one small GET, the ref; the blob never leaves the bucket
    assert len(warm) == 1 and warm[0].startswith(f"GET {prefix}/refs/") and warm[0].endswith(".json"), warm
    assert not [r for r in new_machine + warm if r.startswith(("PUT", "POST", "DELETE"))]


# ------------------------------------------------------------------------------------------------
# a client killed mid-upload

KILLED = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {helpers!r})
    from tiny_models import tiny_mlp, mlp_inputs
    from graphpatch_cache import CacheStore, load_cached
    load_cached(tiny_mlp(), store=CacheStore(sys.argv[1], local_dir=False), **mlp_inputs())
    print("NOT STALLED", flush=True)
    """
).format(helpers=HELPERS_DIR)


@pytest.mark.subprocess
def test_a_client_killed_mid_upload_leaves_nothing_a_reader_accepts(s3, url, tmp_path):
    model, inputs, expected = _mlp()
    prefix = url[len("s3://"):]
    s3.relay.stall(rb"PUT /" + prefix.encode() + rb"/objects/", keep=64)
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    proc = subprocess.Popen([sys.executable, str(script), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_child_env(s3, tmp_path), cwd=TESTS_DIR)
    with reaped(proc):
        assert s3.relay.stalled.wait(timeout=240), proc.communicate(timeout=5) if proc.poll() is not None else ""
        time.sleep(0.2)  # the upload's first bytes reach the server
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert _objects(s3, url, "refs") == {}  # no ref: the ref is written only after its blob
    for name, data in _objects(s3, url, "objects").items():  # and no blob that is not whole
        assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[-1]
    store = CacheStore(url, local_dir=tmp_path / "local")
    assert store.entries() == [] and not store.contains(cache_key(model, **inputs))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, store=store, **inputs)
    assert not cache_warnings(record)
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 0)
    with torch.no_grad():
        assert torch.equal(pg(**inputs), expected)
    _assert_one_valid_entry(s3, url)


# ------------------------------------------------------------------------------------------------
# in this process: corruption, sync, the command line, offline

def _upload(m1, url) -> CacheStore:
    """The primed entry (``m1``'s root) copied to ``url`` with ``sync``; the S3 store."""
    report = sync(CacheStore(m1[3], local_dir=False), CacheStore(url, local_dir=False))
    assert len(report.copied) == 1 and not report.problems
    return CacheStore(url, local_dir=False)


def test_a_corrupted_remote_blob_is_detected_and_rebuilt(s3, m1, url, tmp_path):
    model, inputs, expected, *_ = m1
    _upload(m1, url)
    ((name, data),) = _objects(s3, url, "objects").items()
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0x01
    s3.fs.pipe_file(f"{url[len('s3://'):]}/{name}", bytes(damaged))
    assert [p.kind for p in CacheStore(url, local_dir=False).verify()] == ["corrupt-blob"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, store=CacheStore(url, local_dir=tmp_path / "local"), **inputs)
    assert any("digest mismatch" in str(w.message) for w in cache_warnings(record))
    assert (pg.cache_stats.misses, pg.cache_stats.hits) == (1, 0)
    assert torch.equal(logits(pg, inputs), expected)
    assert _assert_one_valid_entry(s3, url) == name  # rebuilt under the same digest
    (bad,) = _objects(s3, url, "quarantine").values()
    assert bad == bytes(damaged)


def test_sync_both_ways_verifies_digests_and_skips_what_is_there(s3, m1, url, tmp_path):
    model, inputs, expected, *_ = m1
    remote = _upload(m1, url)
    name = _assert_one_valid_entry(s3, url)
    assert _objects(s3, url, "objects")[name] == (Path(m1[3]) / name).read_bytes()
    again = sync(CacheStore(m1[3], local_dir=False), remote)
    assert again.copied == [] and len(again.skipped) == 1
    back = tmp_path / "back"
    report = sync(remote, CacheStore(back, local_dir=False))
    assert len(report.copied) == 1
    assert [p.name for p in local_blobs(back)] == [p.name for p in local_blobs(m1[3])]
    assert all(sha256_file(p) == p.name for p in local_blobs(back))
    assert [p.read_bytes() for p in local_refs(back)] == [p.read_bytes() for p in local_refs(m1[3])]
    pg = load_cached(model, store=CacheStore(back, local_dir=tmp_path / "local"), **inputs)
    assert pg.cache_stats.hits == 1 and torch.equal(logits(pg, inputs), expected)
    # a damaged source blob is reported and not copied
    s3.fs.pipe_file(f"{url[len('s3://'):]}/{name}", b"not the bytes")
    elsewhere = tmp_path / "elsewhere"
    report = sync(remote, CacheStore(elsewhere, local_dir=False))
    assert report.copied == [] and [p.kind for p in report.problems] == ["corrupt-blob"]
    assert local_refs(elsewhere) == [] and local_blobs(elsewhere) == []


def test_the_command_line_on_an_s3_root(s3, m1, url, tmp_path):
    from click.testing import CliRunner

    model, inputs, expected, *_ = m1
    _upload(m1, url)
    key = cache_key(model, **inputs)
    runner = CliRunner(env={"GRAPHPATCH_CACHE_DIR": url, "GRAPHPATCH_CACHE_LOCAL_DIR": str(tmp_path / "local")})
    listed = json.loads(invoke(runner, "ls", "--json").stdout)
    assert listed["root"] == url and [e["key"] for e in listed["entries"]] == [key]
    assert "GPT2LMHeadModel" in invoke(runner, "show", key[:12]).stdout  # the node tree, from the bucket
    assert "1 entries OK" in invoke(runner, "verify").stdout
    invoke(runner, "export", key[:12], "-o", tmp_path / "k.json")
    removed = json.loads(invoke(runner, "rm", key[:12], "--json").stdout)
    assert removed["removed"] == [{"key": key, "variants": 1}]
    assert _objects(s3, url, "refs") == {} and _objects(s3, url, "objects") == {}
    invoke(runner, "import", tmp_path / "k.json")
    _assert_one_valid_entry(s3, url)
    # --cache-dir takes the URL too; gc removes the oldest entries beyond the size limit
    gc = json.loads(invoke(runner, "gc", "--cache-dir", url, "--max-size", "0", "--json").stdout)
    assert len(gc["removed"]) == 1 and gc["removed"][0].startswith(f"{key}/")
    assert _objects(s3, url, "refs") == {} and _objects(s3, url, "objects") == {}
    # sync from the command line: a local root to the bucket, then nothing left to copy
    out = json.loads(invoke(runner, "sync", m1[3], url, "--json").stdout)
    assert len(out["copied"]) == 1 and out["problems"] == []
    out = json.loads(invoke(runner, "sync", m1[3], url, "--json").stdout)
    assert out["copied"] == [] and len(out["skipped"]) == 1
    pg = load_cached(model, store=url, **inputs)
    assert pg.cache_stats.hits == 1 and torch.equal(logits(pg, inputs), expected)


def test_an_unreachable_endpoint_with_a_warm_local_tier_is_a_warning_not_a_failure(s3, m1, url, tmp_path):
    model, inputs, expected, *_ = m1
    _upload(m1, url)
    local = tmp_path / "local"
    warm = load_cached(model, store=CacheStore(url, local_dir=local), **inputs)
    assert warm.cache_stats.hits == 1
    dead = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(model, store=CacheStore(url, local_dir=local, storage_options=dead), **inputs)
    messages = [str(w.message) for w in cache_warnings(record)]
    assert len(messages) == 1 and "cannot be reached" in messages[0] and url in messages[0], messages
    assert (pg.cache_stats.hits, pg.cache_stats.misses) == (1, 0)
    assert torch.equal(logits(pg, inputs), expected)
    assert time.monotonic() - started < 60
    # the command line says what is wrong instead of listing nothing
    with pytest.raises(RemoteStoreError, match="cannot be reached"):
        CacheStore(url, local_dir=False, storage_options=dead).entries()
    # a graph the local tier lacks: extracted here and not cached (a warning), never a failure
    mlp, mlp_in, mlp_out = _mlp()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pg = load_cached(mlp, store=CacheStore(url, local_dir=local, storage_options=dead), **mlp_in)
    assert (pg.cache_stats.misses, pg.cache_stats.write_failures) == (1, 1)
    assert any("cannot write to the cache" in str(w.message) for w in cache_warnings(record))
    with torch.no_grad():
        assert torch.equal(pg(**mlp_in), mlp_out)


def test_the_layout_in_the_bucket_is_the_directory_layout(s3, m1, url):
    """One format everywhere: what sync puts in the bucket is, name for name and byte for byte,
    what the directory root holds."""
    _upload(m1, url)
    on_disk = {str(p.relative_to(m1[3])): p.read_bytes() for p in local_blobs(m1[3]) + local_refs(m1[3])}
    in_bucket = {**_objects(s3, url, "objects"), **_objects(s3, url, "refs")}
    assert in_bucket == on_disk
