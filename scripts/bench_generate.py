"""Greedy generation through the graph, with and without the key/value cache, on CPU.

GPT-2 shape (6 layers, width 512, 8 heads), random weights, batch 1, a 64-token prompt and
64 new tokens. Times ``model.generate(use_cache=True)``, ``pg.generate(use_cache=True)`` and
``pg.generate(use_cache=False)`` interleaved in one run after a warm-up (which also
extracts the prompt's and the per-token graph variants), checks that all three produce the
same tokens, and prints one JSON object.

Run: python scripts/bench_generate.py [--reps 5] [--new-tokens 64] [--threads N]   (not collected by pytest)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from graphpatch_cache import PatchableGraph  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = GPT2Config(n_layer=6, n_embd=512, n_head=8, n_positions=1024, bos_token_id=0, eos_token_id=None)
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(1, config.vocab_size, (1, args.prompt))
    mask = torch.ones_like(ids)
    n = args.new_tokens

    start = time.perf_counter()
    pg = PatchableGraph(model, input_ids=ids, attention_mask=mask, use_cache=True)
    extraction_s = time.perf_counter() - start

    runs = {
        "model_cached": lambda: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                               do_sample=False, use_cache=True),
        "pg_cached": lambda: pg.generate(ids, attention_mask=mask, max_new_tokens=n, use_cache=True),
        "pg_uncached": lambda: pg.generate(ids, attention_mask=mask, max_new_tokens=n, use_cache=False),
    }
    start = time.perf_counter()
    outs = {k: fn() for k, fn in runs.items()}  # warm-up: extracts the remaining variants
    warmup_s = time.perf_counter() - start
    same = all(torch.equal(o, outs["model_cached"]) for o in outs.values())
    times = {k: [] for k in runs}
    for _ in range(args.reps):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "benchmark": "generate",
        "model": "GPT2LMHeadModel(n_layer=6, n_embd=512, n_head=8), random weights, sdpa",
        "prompt_tokens": args.prompt,
        "new_tokens": n,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "same_tokens": same,
        "variants": len(pg.variants),
        "extraction_s": round(extraction_s, 3),
        "warmup_s": round(warmup_s, 3),
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "pg_cached_over_model_cached": round(med["pg_cached"] / med["model_cached"], 3),
        "pg_uncached_over_pg_cached": round(med["pg_uncached"] / med["pg_cached"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
