"""Skip-compilation (opaque) mode against compiled mode, on CPU.

A small transformers causal LM (GPT-2 shape: 4 layers, width 128, 4 heads, random weights,
sdpa) and a 5-Linear ``PreTrainedModel``. For each model and each mode (``compiled``,
``skip_compilation``) it times the extraction, one ``pg(...)`` call at each of three
sequence lengths (the first call at a new length pays for any re-extraction, which is
counted; then the median of ``--reps`` calls), and ``pg.generate`` of 32 new tokens without a
key/value cache (first run, then the median of ``--reps``); each time is also given as a
ratio to the plain model's median doing the same in the same run. A mode that fails records the
error instead. Prints one JSON object.

Then GPT-2 12 x 768 on 128 tokens: per-call cost of both modes at a realistic width.

Run: python scripts/bench_opaque.py [--new-tokens 32] [--threads N]   (not collected by pytest)
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
from transformers import GenerationMixin, GPT2Config, GPT2LMHeadModel, PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.modeling_outputs import CausalLMOutput  # noqa: E402

from graphpatch_cache import ExtractionOptions, PatchableGraph  # noqa: E402


class FiveLinearConfig(PretrainedConfig):
    model_type = "bench_five_linear"

    def __init__(self, vocab_size: int = 100, hidden: int = 64, **kwargs):
        self.vocab_size = vocab_size
        self.hidden = hidden
        super().__init__(**kwargs)


class FiveLinearLM(PreTrainedModel, GenerationMixin):
    """Embedding, five Linears, a head: the shape of the model in the issue's report."""

    config_class = FiveLinearConfig

    def __init__(self, config: FiveLinearConfig):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(config.hidden, config.hidden) for _ in range(5)])
        self.head = torch.nn.Linear(config.hidden, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = torch.relu(layer(h))
        return CausalLMOutput(logits=self.head(h))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _median_time(fn, reps):
    times = []
    for _ in range(reps):
        times.append(_timed(fn)[1])
    return statistics.median(times)


def bench_mode(model, ids, lengths, new_tokens, options, reps):
    row = {}
    try:
        pg, row["extraction_s"] = _timed(lambda: PatchableGraph(model, options, input_ids=ids, use_cache=False))
        row["extraction_s"] = round(row["extraction_s"], 3)
        calls = {}
        for seq in lengths:
            x = torch.randint(1, 100, (ids.shape[0], seq), generator=torch.Generator().manual_seed(seq))
            out, first = _timed(lambda: pg(input_ids=x, use_cache=False))  # pays for any re-extraction
            plain = model(input_ids=x, use_cache=False)
            t_pg = _median_time(lambda: pg(input_ids=x, use_cache=False), reps)
            t_plain = _median_time(lambda: model(input_ids=x, use_cache=False), reps)
            calls[str(seq)] = {"first_s": round(first, 4), "first_over_model": round(first / t_plain, 2),
                               "median_s": round(t_pg, 4), "median_over_model": round(t_pg / t_plain, 2),
                               "equal": bool(torch.equal(_logits(out), _logits(plain)))}
        row["calls"] = calls
        row["variants_after_calls"] = len(pg.variants)
        gen, t_gen = _timed(lambda: pg.generate(ids, max_new_tokens=new_tokens, use_cache=False))
        ref, t_ref = _timed(lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                   do_sample=False, use_cache=False))
        row["generate_first_s"] = round(t_gen, 3)
        row["generate_first_over_model"] = round(t_gen / t_ref, 2)
        row["generate_equal"] = bool(torch.equal(gen, ref))
        row["variants_after_generate"] = len(pg.variants)
        if t_gen < 60:  # (the old code re-extracts at every step: one run is enough to show it)
            t_gen = _median_time(lambda: pg.generate(ids, max_new_tokens=new_tokens, use_cache=False), reps)
            t_ref = _median_time(lambda: model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                        do_sample=False, use_cache=False), reps)
            row["generate_median_s"] = round(t_gen, 3)
            row["generate_median_over_model"] = round(t_gen / t_ref, 2)
    except Exception as exc:  # the old code fails outright in some modes: report, don't stop
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return row


def bench_width(reps: int) -> dict:
    """Per-call cost at a realistic width: GPT-2 12 layers x 768, one sequence of 128 tokens,
    the plain model, compiled and skip_compilation timed interleaved (medians)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12)).eval()
    ids = torch.randint(0, 50000, (1, 128), generator=torch.Generator().manual_seed(1))
    row = {}
    skip, row["extraction_skip_s"] = _timed(
        lambda: PatchableGraph(model, ExtractionOptions(skip_compilation=True), input_ids=ids, use_cache=False))
    compiled, row["extraction_compiled_s"] = _timed(lambda: PatchableGraph(model, input_ids=ids, use_cache=False))
    runs = {"model": model, "compiled": compiled, "skip_compilation": skip}
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn(input_ids=ids, use_cache=False)
    for _ in range(max(reps, 9)):
        for name, fn in runs.items():
            times[name].append(_timed(lambda: fn(input_ids=ids, use_cache=False))[1])
    med = {name: statistics.median(t) for name, t in times.items()}
    row.update({k: round(v, 3) for k, v in row.items()})
    row["model_s"] = round(med["model"], 4)
    row["compiled_over_model"] = round(med["compiled"] / med["model"], 3)
    row["skip_compilation_over_model"] = round(med["skip_compilation"] / med["model"], 3)
    row["equal"] = bool(torch.equal(skip(input_ids=ids, use_cache=False).logits,
                                    model(input_ids=ids, use_cache=False).logits))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gpt2_config = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=100, n_positions=256,
                             bos_token_id=0, eos_token_id=None, pad_token_id=0)
    gpt2_config._attn_implementation = "sdpa"
    models = {
        "gpt2_4x128": GPT2LMHeadModel(gpt2_config).eval(),
        "five_linear": FiveLinearLM(FiveLinearConfig(eos_token_id=None, pad_token_id=0)).eval(),
    }
    ids = torch.randint(1, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    lengths = [16, 23, 40]
    result = {
        "benchmark": "opaque",
        "models": {"gpt2_4x128": "GPT2LMHeadModel(n_layer=4, n_embd=128, n_head=4), random weights, sdpa",
                   "five_linear": "PreTrainedModel: embedding, 5 Linear(64, 64) with relu, head"},
        "batch": ids.shape[0], "prompt_tokens": ids.shape[1], "lengths": lengths, "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(), "reps": args.reps, "torch": torch.__version__, "machine": platform.machine(),
        "results": {},
    }
    with torch.no_grad():
        for name, model in models.items():
            result["results"][name] = {
                "compiled": bench_mode(model, ids, lengths, args.new_tokens, ExtractionOptions(), args.reps),
                "skip_compilation": bench_mode(model, ids, lengths, args.new_tokens,
                                               ExtractionOptions(skip_compilation=True), args.reps),
            }
        result["results"]["gpt2_12x768_seq128"] = bench_width(args.reps)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
