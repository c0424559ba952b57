"""Cost of entering and leaving ``pg.patch`` with many patched nodes, on CPU.

Llama with 8 layers, width 64 (4 heads, 2 key/value heads), vocab 256, random weights,
input (1, 16), no KV cache. A ProbePatch on every value node (parameters excluded), the
context entered and left around each call, as a user recording activations does. Prints one
JSON object: medians over the repeated entries, the first entry apart (it generates code).

Run: python scripts/bench_patch.py [--reps 6] [--layers 8]   (not collected by pytest)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from graphpatch_cache import PatchableGraph, ProbePatch  # noqa: E402

from bench_peers import value_paths  # noqa: E402  (this directory: run as a script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 16))
    pg = PatchableGraph(model, input_ids=ids, use_cache=False)
    paths = value_paths(pg.graph, [])
    enters, calls, exits, models = [], [], [], []
    exact = True
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        for _ in range(args.reps):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            models.append(time.perf_counter() - start)
            probes = {p: ProbePatch() for p in paths}
            t0 = time.perf_counter()
            context = pg.patch(probes)
            context.__enter__()
            t1 = time.perf_counter()
            out = pg(input_ids=ids, use_cache=False).logits
            t2 = time.perf_counter()
            context.__exit__(None, None, None)
            t3 = time.perf_counter()
            exact = exact and torch.equal(out, expected) and all(p.activation is not None for p in probes.values())
            enters.append(t1 - t0)
            calls.append(t2 - t1)
            exits.append(t3 - t2)
        exact = exact and torch.equal(pg(input_ids=ids, use_cache=False).logits, expected)
    print(json.dumps({
        "model": f"LlamaForCausalLM {args.layers} layers x 64, input (1, 16)",
        "patched_nodes": len(paths),
        "reps": args.reps,
        "model_forward_median_s": round(statistics.median(models), 5),
        "first_enter_s": round(enters[0], 4),
        "enter_median_s": round(statistics.median(enters[1:]), 4),
        "patched_call_median_s": round(statistics.median(calls), 4),
        "exit_median_s": round(statistics.median(exits[1:]), 4),
        "outputs_exact_and_all_recorded": exact,
    }, indent=2))


if __name__ == "__main__":
    main()
