"""The main job on the embedded default model, end to end:

1. ``graphpatch-cache build tiny-gpt2`` into a fresh cache (from the preset's config alone,
   on the meta device: no weights),
2. a tiny GPT-2 with random weights, loaded with ``load_cached`` on what a tokenizer returns
   (``input_ids`` and ``attention_mask``): a cache hit,
3. probe and zero a node, and show what changed.

Run: python scripts/demo.py   (no downloads; the fresh cache lives in a temp dir)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from transformers import GPT2LMHeadModel

    from graphpatch_cache import CacheStore, ProbePatch, ZeroPatch, load_cached
    from graphpatch_cache.cli.presets import PRESETS, preset_config

    with tempfile.TemporaryDirectory() as tmp:
        root, local = Path(tmp) / "cache", Path(tmp) / "local"
        print("$ graphpatch-cache build tiny-gpt2 --cache-dir", root)
        subprocess.run([sys.executable, "-m", "graphpatch_cache", "build", "tiny-gpt2", "--cache-dir", str(root)],
                       check=True, env={**__import__("os").environ, "GRAPHPATCH_CACHE_LOCAL_DIR": str(local)})

        torch.manual_seed(0)
        config = preset_config(PRESETS["tiny-gpt2"])
        model = GPT2LMHeadModel(config).eval()  # random weights: any weights share the graph
        ids = torch.randint(0, config.vocab_size, (2, 12))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # what a tokenizer returns
        start = time.perf_counter()
        pg = load_cached(model, store=CacheStore(root, local_dir=local), **inputs)
        load_s = time.perf_counter() - start
        print(f"\nload_cached: {'cache hit' if pg.cache_stats.hits else 'extracted'} in {load_s:.2f} s, "
              f"{len(pg.node_paths())} value nodes (pg.node_paths())")

        node = "transformer.h_1.mlp.act.mul_3"
        with torch.no_grad():
            original = model(**inputs).logits
            unpatched = pg(**inputs).logits
            with pg.patch({node: [probe := ProbePatch(), ZeroPatch()]}):
                patched = pg(**inputs).logits
        print(f"unpatched graph equals the model exactly (2 x 12 tokens, not the shape it was built with): "
              f"{torch.equal(original, unpatched)}")
        print(f"probe at {node}: shape {tuple(probe.activation.shape)}, mean |value| {probe.activation.abs().mean():.4f}")
        delta = (patched - unpatched).abs()
        print(f"zeroing it changes the logits: max |delta| {delta.max():.4f}, mean |delta| {delta.mean():.4f}")
        print("\nthe patched MLP's graph:")
        print(repr(pg.graph.transformer.h_1.mlp.act))
        print(f"graph variants used: {len(pg.variants)} (no extraction after the build)")


if __name__ == "__main__":
    main()
