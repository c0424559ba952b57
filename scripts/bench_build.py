"""Build the Llama-2-7B configuration's graphs on the meta device (no weights) and report
time and peak RSS as JSON. Target: peak RSS under 2 GB on the 2-core CI machine.

Run: python scripts/bench_build.py
"""

from __future__ import annotations

import json
import resource
import tempfile
import time

import torch


def main() -> None:
    from transformers import LlamaConfig

    import graphpatch_cache
    from graphpatch_cache import CacheStore, build

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with tempfile.TemporaryDirectory() as tmp:
        store = CacheStore(f"{tmp}/root", local_dir=f"{tmp}/local")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        result = build(config, store=store, dtype=torch.float16)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        again = time.perf_counter()
        cached = build(config, store=store, dtype=torch.float16)
        rebuild_s = time.perf_counter() - again
    print(json.dumps({
        "model": "Llama-2-7B configuration (hidden 4096, 32 layers, vocab 32000), float16, meta device",
        "torch": torch.__version__,
        "graphpatch_cache": graphpatch_cache.__version__,
        "build_s": round(seconds, 2),
        "second_build_s (cache hit)": round(rebuild_s, 3),
        "second_build_cached": cached.cached,
        "artifact_bytes": result.entry.size if result.entry else None,
        "peak_rss_mb": round(peak, 1),
        "rss_before_mb": round(rss_before, 1),
        "targets": {"peak_rss_mb_max": 2048},
        "target_met": peak < 2048,
        "key": result.key,
    }, indent=2))


if __name__ == "__main__":
    main()
