"""``graphpatch-cache build MODEL``: extract a model's graphs from its config and cache them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import click

from graphpatch_cache import show_progress
from graphpatch_cache.errors import CacheError

from .options import common_options, model_options, model_spec, open_store
from .output import emit_json, human_size, short_class
from .presets import PRESETS


@click.command(epilog=f"""\b
By default MODEL gets the graphs of the calls people make (any batch size and length >= 2,
plus their one-sequence twins where the cache does not already serve them):
  forward            input_ids + attention_mask (a tokenizer's outputs), use_cache left out
  generate: prompt   the first step of pg.generate (use_cache=True; the mask and the
                     position ids it passes, as model.generate does)
  generate: step     each later step (one token and the key/value cache)
(the generate graphs for causal LMs; one "generate" graph, use_cache=False, for one that
generates without a key/value cache; encoder-decoders: forward only). Any of --batch-size,
--seq-len, --[no-]attention-mask, --[no-]use-cache, --past-length builds that one call only.

\b
Presets: {", ".join(PRESETS)}.

\b
--json prints:
  {{"model": MODEL, "source": "preset" | "directory" | "hub", "origin": what `ls` shows,
   "model_class": qualified class name, "dtype": "float16", "quantization": null | "8bit",
   "key", "variant", "digest", "size", "graphs", "nodes", "modules": of the first call,
   "seconds": float (all calls), "cached": bool (every call was already there),
   "root": cache root,
   "calls": [{{"call": name, "key": 64 hex digits | null, "variant": str, "digest": sha256 of
              the artifact, "size": artifact bytes, "graphs": module graphs, "nodes": nodes in
              all graphs, "seconds": float, "cached": bool, "served_by": null | the key whose
              graph already serves this call (nothing built), "serves": the call shape in
              words, "shape": the call shape as data (see `ls --help`)}}, ...]}}

\b
Examples:
  graphpatch-cache build llama-7b
  graphpatch-cache build gpt2 --dtype float16
  graphpatch-cache build gpt2 --batch-size 1 --no-attention-mask --no-use-cache
  graphpatch-cache build ./my-model-dir --load-in-8bit
  graphpatch-cache build Qwen/Qwen2-0.5B --json
""")
@click.argument("model")
@model_options
@click.option("--device-map", metavar="MAP",
              help="The device_map you will load the model with (auto, balanced, sequential, a JSON "
                   "object or a JSON file): checked against the model's modules. Graphs do not depend "
                   "on it, so the same entry serves every device map.")
@click.option("--force", is_flag=True, help="Extract again even when the cache has the graph.")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress on stderr (also GRAPHPATCH_CACHE_PROGRESS=0; --json implies it).")
@common_options
def build(model: str, dtype: str, load_in_8bit: bool, batch_size: Optional[int], seq_len: Optional[int],
          attention_mask: Optional[bool], use_cache: Optional[bool], past_length: Optional[int],
          device_map: Optional[str], force: bool, quiet: bool, cache_dir: Optional[Path], as_json: bool) -> None:
    """Extract MODEL's graphs from its config alone (meta device, no weights) and cache them.

    MODEL is a preset name, a directory with config.json, or a Hugging Face Hub id whose
    config is already in the local Hugging Face cache (nothing is downloaded). The graphs are
    stored under the keys load_cached() computes for the real model loaded with
    from_pretrained() in the same dtype, called as a tokenizer's outputs and pg.generate call
    it (or as the call-shape options say).
    """
    spec = model_spec(model, dtype, load_in_8bit, batch_size, seq_len, attention_mask, use_cache, past_length)
    # deferred: imports torch (after MODEL resolved)
    from graphpatch_cache.cache import (FREE_SIZE, CallShape, artifact_summary, build_calls, call_shape,
                                        describe_call_shape)

    store = open_store(cache_dir)
    resolved = spec["resolved"]
    shapes = None if spec["signature"] is None else [CallShape("call", spec["signature"])]
    start = time.perf_counter()
    # each extraction's phases on stderr from its start: a bar on a terminal, a line each in a
    # pipe or log (a cache hit extracts nothing and prints none)
    with show_progress(not (quiet or as_json)):
        done = build_calls(resolved.config, shapes, dtype=spec["dtype"], quantization=spec["quantization"],
                           store=store, force=force, device_map=_device_map(device_map), origin=spec["origin"])
    seconds = time.perf_counter() - start
    calls: List[Dict[str, Any]] = []
    for item in done:
        if item.result is None:
            served = item.served_by
            calls.append({"call": item.name, "key": None, "variant": None, "digest": None, "size": 0, "graphs": 0,
                          "nodes": 0, "seconds": 0.0, "cached": True, "served_by": served and served.key,
                          "serves": served and describe_call_shape(served.signature), "shape": None})
            continue
        entry = item.result.entry
        if entry is None:
            raise CacheError(f"the graph was extracted but could not be stored in {store.root}", path=str(store.root),
                             hint="check that the cache directory is writable, or pass --cache-dir")
        summary = artifact_summary(item.result.artifact)
        calls.append({"call": item.name, "key": item.result.key, "variant": entry.variant, "digest": entry.digest,
                      "size": entry.size, "graphs": summary["graphs"], "nodes": summary["nodes"],
                      "modules": summary["modules"], "seconds": round(item.result.seconds, 3),
                      "cached": item.result.cached, "served_by": None,
                      "serves": describe_call_shape(entry.signature), "shape": call_shape(entry.signature)})
    first = next(c for c in calls if c["key"] is not None)
    first_result = next(i.result for i in done if i.result is not None)
    dtype_name = str(spec["dtype"]).removeprefix("torch.")
    cached = all(c["cached"] for c in calls)
    if as_json:
        emit_json({
            "model": model, "source": resolved.source, "origin": spec["origin"],
            "model_class": first_result.artifact.model_class, "dtype": dtype_name,
            "quantization": spec["quantization"],
            **{k: first[k] for k in ("key", "variant", "digest", "size", "graphs", "nodes", "modules")},
            "seconds": round(seconds, 3), "cached": cached, "root": str(store.root),
            "calls": [{k: v for k, v in c.items() if k != "modules"} for c in calls],
        })
        return
    what = f"{short_class(first_result.artifact.model_class)}, {dtype_name}" + (", 8-bit" if spec["quantization"] else "")
    built = [c for c in calls if c["key"] is not None and not c["cached"]]
    if cached:
        click.echo(f"{model} ({what}) is already cached (--force extracts again)")
    else:
        click.echo(f"built {model} ({what}): {len(built)} graph variant{'s' if len(built) != 1 else ''} "
                   f"in {seconds:.1f} s")
    width = max(len(c["call"]) for c in calls)
    for c in calls:
        if c["key"] is None:
            click.echo(f"  {c['call']:<{width}}  {c['served_by'][:12]}   served  by the graph above")
        else:
            state = "cached" if c["cached"] else f"{c['seconds']:.1f} s"
            click.echo(f"  {c['call']:<{width}}  {c['key'][:12]}  {state:>7}  {c['serves']}")
    if len(calls) == 1:
        click.echo(f"key      {first['key']}")
    sizes = {c["digest"]: c["size"] for c in calls if c["digest"]}
    click.echo(f"size     {human_size(sum(sizes.values()))}")
    modules = f", {first['modules']} modules in the model" if first["modules"] else ""
    click.echo(f"graphs   {first['graphs']} module graphs, {first['nodes']} nodes per call{modules}")
    click.echo(f"letters  b, s, past: {FREE_SIZE}")
    click.echo(f"cache    {store.root}")


def _device_map(text: Optional[str]) -> Any:
    """--device-map: a strategy name, a JSON object, or a JSON file holding one."""
    from graphpatch_cache.cache import DEVICE_MAP_STRATEGIES  # deferred: imports torch

    if text is None or text in DEVICE_MAP_STRATEGIES:
        return text
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise click.BadParameter(f"{text!r} is neither a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}), a "
                                     "JSON object nor a JSON file", param_hint="--device-map")
        source = path.read_text()
    try:
        value = json.loads(source)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--device-map") from exc
    if not isinstance(value, dict):
        raise click.BadParameter("a device map is a JSON object {module: device}", param_hint="--device-map")
    return value


__all__ = ["build"]
