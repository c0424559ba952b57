"""Per-call cost of graphpatch-cache against the plain model and nnsight, in one process, on CPU.

Workloads (random weights, eval mode, no grad, ``use_cache=False``):

- ``W1``: GPT-2 small shape (12 layers x 768, 12 heads), input (1, 128);
- ``W2``: Llama 32 layers x 64, 4 heads, 2 key/value heads, vocab 256, input (1, 16).

Modes, each timed as the ratio to the plain model's forward in the same repetition (median of
``--reps`` interleaved repetitions; the order of the systems rotates per repetition):

- ``none``: a call with no patch active;
- ``one``: a ``ProbePatch`` on one node (the middle layer's MLP output), context entered per call;
- ``all``: a ``ProbePatch`` on every value node (parameters excluded), context entered per call,
  the way a user recording activations does (the probes are built inside the timed region);
- ``record``: ``pg.record(..., nodes="*")`` (every value node), when the library has it.

nnsight (when installed; it is not a dependency): ``none`` is a bare ``trace``, ``one`` saves the
same module's output, ``all`` saves every module's output (in execution order, as nnsight
requires). Without nnsight its columns are ``null`` with a note.

``hit``: in a fresh process per run (imports and building the model not timed), the time from
``load_cached`` entry to the hit's returned graph (``load_s``) and to its first output
(``first_output_s``), for W2 and the Llama-2-7B configuration on meta (no output on meta).

Outputs are checked ``torch.equal`` to the plain model's. Prints one JSON object with
``targets`` (the issue's table) and which of them hold.

``--keep-freed-memory`` calls :func:`graphpatch_cache.keep_freed_memory` first (glibc keeps
freed pages for the next call instead of refaulting them; see that function). The allocator
settings in effect (that, ``MALLOC_*`` variables, ``LD_PRELOAD``) are in ``env.allocator``.

Run: python scripts/bench_peers.py [--reps 15] [--hit-runs 3] [--only W1 W2] [--keep-freed-memory]
(not collected by pytest)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import graphpatch_cache  # noqa: E402
from graphpatch_cache import CacheStore, PatchableGraph, ProbePatch, load_cached  # noqa: E402

TARGETS = {
    "W1": {"none": 1.03, "one": 1.05, "all": 1.5},
    "W2": {"none": 1.10, "one": 1.15, "all": 2.5},
    "hit_first_output_s": {"W2": 0.15, "llama2_7b_meta": 0.2},
}


def w1():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024)
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "use_cache": False}, "transformer.h.6.mlp"


def w2():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "use_cache": False}, "model.layers.16.mlp"


def llama2_7b_meta():
    from accelerate import init_empty_weights

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
    config._attn_implementation = "sdpa"
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config)
    ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(1))
    return model.eval(), {"input_ids": ids, "use_cache": False}, None


WORKLOADS = {"W1": w1, "W2": w2, "llama2_7b_meta": llama2_7b_meta}


def value_paths(node, out):
    """Every value node under ``node`` (parameters and buffers excluded)."""
    for child in node:
        if child._is_value and "|" not in str(child):
            if not str(child).endswith(("weight", "bias")):
                out.append(str(child))
        else:
            value_paths(child, out)
    return out


def graph_path(module_name: str) -> str:
    """``model.layers.16.mlp`` -> the graph's path of that module's output."""
    return ".".join(p if not p.isdigit() else f"_{p}" for p in module_name.split(".")).replace("._", "_") + ".output"


def module_order(model, inputs):
    """Module names in the order their forward returns (nnsight wants outputs in that order)."""
    order = []
    handles = [m.register_forward_hook(lambda *_, name=name: order.append(name)) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return order


def nnsight_runners(model, inputs, one_module):
    try:
        from nnsight import NNsight
    except ImportError:
        return None, "nnsight not installed (pip install nnsight); its columns are null"
    import nnsight

    import copy

    order = module_order(model, inputs)
    wrapped = NNsight(copy.deepcopy(model))  # NNsight rewrites the forward of the model it wraps

    def env_of(name):
        env = wrapped
        for part in name.split("."):
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        return env

    def none():
        with wrapped.trace(**inputs):
            out = wrapped.output.save()
        return out

    def one():
        with wrapped.trace(**inputs):
            act = env_of(one_module).output.save()
            out = wrapped.output.save()
        assert act is not None
        return out

    saved = {}

    def all_():
        saved.clear()
        with wrapped.trace(**inputs):
            for name in order:
                saved[name] = env_of(name).output.save()
            out = wrapped.output.save()
        assert len(saved) == len(order)
        return out

    return {"none": none, "one": one, "all": all_, "modules": len(order)}, f"nnsight {nnsight.__version__}"


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def bench_workload(name: str, reps: int) -> dict:
    model, inputs, one_module = WORKLOADS[name]()
    pg = PatchableGraph(model, **inputs)
    paths = value_paths(pg.graph, [])
    one_path = graph_path(one_module)
    if one_path not in paths:
        one_path = next(p for p in paths if p.startswith(graph_path(one_module)[: -len(".output")]))
    nn, nn_note = nnsight_runners(model, inputs, one_module)
    has_record = hasattr(pg, "record")
    exact = {}

    def pg_none():
        return pg(**inputs)

    def pg_one():
        probe = ProbePatch()
        with pg.patch({one_path: probe}):
            out = pg(**inputs)
        assert probe.activation is not None
        return out

    def pg_all():
        probes = {p: ProbePatch() for p in paths}
        with pg.patch(probes):
            out = pg(**inputs)
        return out

    def pg_record():
        out, acts = pg.record(**inputs, nodes="*")
        assert len(acts) > len(paths) // 2
        return out

    systems = {"pg_none": pg_none, "pg_one": pg_one, "pg_all": pg_all}
    if has_record:
        systems["pg_record"] = pg_record
    if nn:
        systems.update({"nnsight_none": nn["none"], "nnsight_one": nn["one"], "nnsight_all": nn["all"]})
    times = {k: [] for k in ["model", *systems]}
    ratios = {k: [] for k in systems}
    with torch.no_grad():
        expected = logits(model(**inputs))
        for k, fn in systems.items():  # warm-up: first entries generate code; nnsight compiles its trace
            out = fn()
            exact[k] = bool(torch.equal(logits(out), expected))
        for rep in range(reps):
            names = list(systems)
            names = names[rep % len(names):] + names[: rep % len(names)]
            gc.collect()
            start = time.perf_counter()
            model(**inputs)
            base = time.perf_counter() - start
            times["model"].append(base)
            for k in names:
                start = time.perf_counter()
                systems[k]()
                t = time.perf_counter() - start
                times[k].append(t)
                ratios[k].append(t / base)
    result = {
        "model_forward_median_s": round(statistics.median(times["model"]), 5),
        "value_nodes": len(paths),
        "one_probe_node": one_path,
        "nnsight": nn_note,
        "nnsight_modules_saved_in_all": nn["modules"] if nn else None,
        "outputs_exact": exact,
    }
    for k in systems:
        result[f"{k}_ratio"] = round(statistics.median(ratios[k]), 3)
        result[f"{k}_median_s"] = round(statistics.median(times[k]), 5)
    result["ratio_spread_pg_none"] = [round(min(ratios["pg_none"]), 3), round(max(ratios["pg_none"]), 3)]
    return result


def child_hit(name: str, root: str, local: str) -> None:
    model, inputs, _ = WORKLOADS[name]()
    on_meta = any(p.is_meta for p in model.parameters())
    gc.collect()
    start = time.perf_counter()
    pg = load_cached(model, store=CacheStore(root, local_dir=local), **inputs)
    loaded = time.perf_counter() - start
    exact = None
    if not on_meta:
        with torch.no_grad():
            out = pg(**inputs)
        first = time.perf_counter() - start
        with torch.no_grad():
            exact = bool(torch.equal(logits(out), logits(model(**inputs))))
    else:
        first = loaded
    print(json.dumps({"load_s": loaded, "first_output_s": first, "exact": exact,
                      "hits": pg.cache_stats.hits, "misses": pg.cache_stats.misses}))


def bench_hit(name: str, runs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpc_peers_") as tmp:
        root, local = Path(tmp) / "root", Path(tmp) / "local"
        model, inputs, _ = WORKLOADS[name]()
        load_cached(model, store=CacheStore(root, local_dir=local), **inputs)  # the miss fills the store
        del model
        reports = []
        for _ in range(runs):
            proc = subprocess.run([sys.executable, __file__, "--child", name, str(root), str(local)],
                                  capture_output=True, text=True, check=True)
            report = json.loads(proc.stdout.strip().splitlines()[-1])
            if (report["hits"], report["misses"]) != (1, 0):
                raise RuntimeError(f"fresh-process run of {name} was not a hit: {report}")
            reports.append(report)
    return {
        "load_s": round(statistics.median(r["load_s"] for r in reports), 4),
        "first_output_s": round(statistics.median(r["first_output_s"] for r in reports), 4),
        "first_output_times_s": [round(r["first_output_s"], 4) for r in reports],
        "outputs_exact": None if reports[0]["exact"] is None else all(r["exact"] for r in reports),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--hit-runs", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=["W1", "W2", "hits"], default=None)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call graphpatch_cache.keep_freed_memory() first (glibc keeps freed pages for reuse)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    allocator = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    if args.keep_freed_memory:
        allocator["keep_freed_memory"] = vars(graphpatch_cache.keep_freed_memory())
    if args.child:
        child_hit(*args.child)
        return
    only = args.only or ["W1", "W2", "hits"]
    report = {
        "env": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                "graphpatch_cache": graphpatch_cache.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                "allocator": allocator or "default"},
        "reps": args.reps,
        "workloads": {},
        "hits": {},
    }
    for name in ("W1", "W2"):
        if name in only:
            print(f"[bench_peers] {name} ...", file=sys.stderr, flush=True)
            report["workloads"][name] = bench_workload(name, args.reps)
            gc.collect()
    if "hits" in only:
        for name in ("W2", "llama2_7b_meta"):
            print(f"[bench_peers] fresh-process hit {name} ...", file=sys.stderr, flush=True)
            report["hits"][name] = bench_hit(name, args.hit_runs)
    met = {}
    for name, result in report["workloads"].items():
        for mode, limit in TARGETS[name].items():
            met[f"{name}_{mode}<={limit}x"] = result[f"pg_{mode}_ratio"] <= limit
    for name, result in report["hits"].items():
        limit = TARGETS["hit_first_output_s"][name]
        met[f"hit_{name}<={limit}s"] = result["first_output_s"] <= limit
    report["targets"] = TARGETS
    report["targets_met"] = met
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
