"""The main job on the embedded default model: a tiny GPT-2, extracted (or loaded from the
cache), patched, and the effect shown.

Run: python scripts/demo.py   (random weights, no downloads; the graph cache lives in
$GRAPHPATCH_CACHE_DIR or the user cache dir, so a second run is a cache hit)
"""

from __future__ import annotations

import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from graphpatch_cache import ProbePatch, ZeroPatch, load_cached


def main() -> None:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=18, n_embd=64, n_head=4, vocab_size=512, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 512, (2, 16)), "use_cache": False}

    start = time.perf_counter()
    pg = load_cached(model, **inputs)
    load_s = time.perf_counter() - start
    how = "cache hit" if pg.cache_stats.hits else "extracted and cached"

    with torch.no_grad():
        original = model(**inputs).logits
        unpatched = pg(**inputs).logits
        node = "transformer.h_17.mlp.act.mul_3"
        with pg.patch({node: [probe := ProbePatch(), ZeroPatch()]}):
            patched = pg(**inputs).logits

    print(f"model: GPT-2, {config.n_layer} layers, width {config.n_embd} (random weights)")
    print(f"graph: {how} in {load_s:.2f} s (key {pg.cache_stats.keys[0][:12]}), {len(pg.graph._np_index)} node paths")
    print(f"unpatched graph equals the model exactly: {torch.equal(original, unpatched)}")
    print(f"probe at {node}: shape {tuple(probe.activation.shape)}, mean |value| {probe.activation.abs().mean():.4f}")
    delta = (patched - unpatched).abs()
    print(f"zeroing it changes the logits: max |delta| {delta.max():.4f}, mean |delta| {delta.mean():.4f}")
    print("the patched MLP's graph:")
    print(repr(pg.graph.transformer.h_17.mlp))


if __name__ == "__main__":
    main()
