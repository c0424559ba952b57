"""keep_freed_memory: freed pages stay in the process (oracle: the kernel's RSS and page-fault
counts of a fresh process), and the helper fails with typed errors where it cannot act."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import graphpatch_cache
from graphpatch_cache import AllocatorError, keep_freed_memory
from graphpatch_cache.runtime import memory

_CHILD = textwrap.dedent("""
    import gc, json, resource, sys
    import torch
    if sys.argv[1] == "keep":
        import graphpatch_cache
        settings = graphpatch_cache.keep_freed_memory()
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    def activations():  # what a recorded call keeps alive: hundreds of 1-3 MiB tensors, pages touched
        return [torch.ones(256 * 1024) for _ in range(200)] + [torch.ones(768 * 1024) for _ in range(40)]
    held = activations(); peak = rss(); del held; gc.collect(); after = rss()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = activations()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"peak": peak, "after_free": after, "faults": faults}))
""")


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's behaviour")
def test_freed_activations_stay_mapped_and_the_next_call_does_not_refault_them():
    held_pages = (200 * 1 + 40 * 3) * 1024 * 1024 // 4096  # 320 MiB of 4 KiB pages
    default, kept = _run("default"), _run("keep")
    # glibc's default gives most of the freed memory back, and the next round faults it in again
    assert default["peak"] - default["after_free"] > 200 * 2 ** 20
    assert default["faults"] > held_pages // 2
    # with the helper the process keeps it, and the next round reuses it without faulting
    assert kept["after_free"] >= kept["peak"] - 16 * 2 ** 20
    assert kept["faults"] < held_pages // 20


def test_settings_are_reported_and_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=memory.MAX_MMAP_THRESHOLD + 1)
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(trim_threshold=0)


def test_a_c_library_without_mallopt_gets_a_typed_error(monkeypatch):
    # a C library that cannot be opened stands for one that is not glibc (musl, macOS)
    monkeypatch.setattr(memory.ctypes.util, "find_library", lambda name: "/nonexistent/libc-that-is-not-glibc.so")
    with pytest.raises(AllocatorError, match="glibc") as err:
        keep_freed_memory()
    assert "LD_PRELOAD" in str(err.value)
    assert isinstance(err.value, graphpatch_cache.GraphPatchCacheError)
