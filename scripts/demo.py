"""The main job on the embedded default model: extract a tiny GPT-2, patch it, show the effect.

Run: python scripts/demo.py   (prints a short report; no downloads, random weights)
"""

from __future__ import annotations

import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from graphpatch_cache import PatchableGraph, ProbePatch, ZeroPatch


def main() -> None:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=18, n_embd=64, n_head=4, vocab_size=512, n_positions=128)
    model = GPT2LMHeadModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 512, (2, 16)), "use_cache": False}

    start = time.perf_counter()
    pg = PatchableGraph(model, **inputs)
    extract_s = time.perf_counter() - start

    with torch.no_grad():
        original = model(**inputs).logits
        unpatched = pg(**inputs).logits
        node = "transformer.h_17.mlp.act.mul_3"
        with pg.patch({node: [probe := ProbePatch(), ZeroPatch()]}):
            patched = pg(**inputs).logits

    print(f"model: GPT-2, {config.n_layer} layers, width {config.n_embd} (random weights)")
    print(f"extraction: {extract_s:.2f} s, {len(pg.graph._np_index)} node paths")
    print(f"unpatched graph equals the model exactly: {torch.equal(original, unpatched)}")
    print(f"probe at {node}: shape {tuple(probe.activation.shape)}, mean |value| {probe.activation.abs().mean():.4f}")
    delta = (patched - unpatched).abs()
    print(f"zeroing it changes the logits: max |delta| {delta.max():.4f}, mean |delta| {delta.mean():.4f}")
    print("subtree:")
    print(repr(pg.graph.transformer.h_17.mlp))


if __name__ == "__main__":
    main()
