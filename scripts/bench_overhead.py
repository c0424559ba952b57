"""Runtime overhead of PatchableGraph over the plain model, on CPU.

GPT-2 small shape (12 layers, width 768, 12 heads), random weights, batch 1, sequence 128,
under torch.no_grad. Model, unpatched pg and pg with one ProbePatch active are timed
interleaved in the same run after a warm-up; prints one JSON object.

Run: python scripts/bench_overhead.py [--reps 20] [--threads N]   (not collected by pytest)
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

from graphpatch_cache import PatchableGraph, ProbePatch  # noqa: E402

PROBE_NODE = "transformer.h_6.mlp.act.mul_3"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024)
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config).eval()
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (1, 128)), "use_cache": False}

    start = time.perf_counter()
    pg = PatchableGraph(model, **inputs)
    extraction_s = time.perf_counter() - start

    probe = ProbePatch()
    times = {"model": [], "pg": [], "pg_probe": []}
    patch_ctx_s = []  # entering + leaving the patch context (regenerates one module's code)

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    def with_probe():
        ctx = pg.patch({PROBE_NODE: probe})
        t_enter, _ = timed(ctx.__enter__)
        try:
            t_call, out = timed(lambda: pg(**inputs))  # only the forward counts as pg_probe
        finally:
            t_exit, _ = timed(lambda: ctx.__exit__(None, None, None))
        return t_call, t_enter + t_exit, out

    with torch.no_grad():
        ref = model(**inputs).logits
        exact = torch.equal(pg(**inputs).logits, ref)
        probe_exact = torch.equal(with_probe()[2].logits, ref)
        for _ in range(args.warmup):
            model(**inputs), pg(**inputs), with_probe()
        for _ in range(args.reps):  # interleaved
            times["model"].append(timed(lambda: model(**inputs))[0])
            times["pg"].append(timed(lambda: pg(**inputs))[0])
            t_call, t_ctx, _ = with_probe()
            times["pg_probe"].append(t_call)
            patch_ctx_s.append(t_ctx)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": "GPT2LMHeadModel n_layer=12 n_embd=768 n_head=12 vocab=50257 (random weights, sdpa)",
        "input": "batch 1, seq 128, CPU, torch.no_grad",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "reps": args.reps,
        "probe_node": PROBE_NODE,
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "min_s": {k: round(min(v), 5) for k, v in times.items()},
        "max_s": {k: round(max(v), 5) for k, v in times.items()},
        "ratio_pg_over_model": round(med["pg"] / med["model"], 4),
        "ratio_pg_probe_over_model": round(med["pg_probe"] / med["model"], 4),
        "patch_enter_exit_median_s": round(statistics.median(patch_ctx_s), 5),
        "extraction_s": round(extraction_s, 3),
        "unpatched_exact": exact,
        "probe_exact": probe_exact,
        "probe_shape": list(probe.activation.shape),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
