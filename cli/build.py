"""``graphpatch-cache build MODEL``: extract a model's graphs from its config and cache them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click

from graphpatch_cache import show_progress
from graphpatch_cache.errors import CacheError

from .options import common_options, model_options, model_spec, open_store
from .output import emit_json, human_size, short_class
from .presets import PRESETS


@click.command(epilog=f"""\b
Presets: {", ".join(PRESETS)}.

\b
--json prints:
  {{"model": MODEL, "source": "preset" | "directory" | "hub",
   "model_class": qualified class name, "dtype": "float16", "quantization": null | "8bit",
   "key": 64 hex digits, "variant": str, "digest": sha256 of the artifact,
   "size": artifact bytes, "graphs": module graphs, "nodes": nodes in all graphs,
   "modules": modules in the model, "seconds": float, "cached": bool (already there),
   "root": cache root}}

\b
Examples:
  graphpatch-cache build llama-7b
  graphpatch-cache build gpt2 --dtype float16 --batch-size 2
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
def build(model: str, dtype: str, load_in_8bit: bool, batch_size: int, seq_len: int, attention_mask: bool,
          use_cache: bool, past_length: int, device_map: Optional[str], force: bool, quiet: bool,
          cache_dir: Optional[Path], as_json: bool) -> None:
    """Extract MODEL's graphs from its config alone (meta device, no weights) and cache them.

    MODEL is a preset name, a directory with config.json, or a Hugging Face Hub id whose
    config is already in the local Hugging Face cache (nothing is downloaded). The graph is
    stored under the key load_cached() computes for the real model loaded with
    from_pretrained() in the same dtype, with inputs of the same shape class.
    """
    spec = model_spec(model, dtype, load_in_8bit, batch_size, seq_len, attention_mask, use_cache, past_length)
    from graphpatch_cache.cache import artifact_summary  # deferred: imports torch (after MODEL resolved)
    from graphpatch_cache.cache import build as build_graph  # deferred: imports torch

    store = open_store(cache_dir)
    resolved = spec["resolved"]
    # an extraction's phases on stderr from its start: a bar on a terminal, a line each in a
    # pipe or log (a cache hit extracts nothing and prints none)
    with show_progress(not (quiet or as_json)):
        result = build_graph(resolved.config, dtype=spec["dtype"], quantization=spec["quantization"],
                             store=store, signature=spec["signature"], force=force,
                             device_map=_device_map(device_map))
    entry = result.entry
    if entry is None:
        raise CacheError(f"the graph was extracted but could not be stored in {store.root}", path=str(store.root),
                         hint="check that the cache directory is writable, or pass --cache-dir")
    summary = artifact_summary(result.artifact)
    size = entry.size
    dtype_name = str(spec["dtype"]).removeprefix("torch.")
    if as_json:
        emit_json({
            "model": model,
            "source": resolved.source,
            "model_class": result.artifact.model_class,
            "dtype": dtype_name,
            "quantization": spec["quantization"],
            "key": result.key,
            "variant": entry.variant,
            "digest": entry.digest,
            "size": size,
            "graphs": summary["graphs"],
            "nodes": summary["nodes"],
            "modules": summary["modules"],
            "seconds": round(result.seconds, 3),
            "cached": result.cached,
            "root": str(store.root),
        })
        return
    what = f"{short_class(result.artifact.model_class)}, {dtype_name}" + (", 8-bit" if spec["quantization"] else "")
    if result.cached:
        click.echo(f"{model} ({what}) is already cached (--force extracts again)")
    else:
        click.echo(f"built {model} ({what}) in {result.seconds:.1f} s")
    click.echo(f"key      {result.key}")
    click.echo(f"size     {human_size(size)}")
    modules = f", {summary['modules']} modules in the model" if summary["modules"] else ""
    click.echo(f"graphs   {summary['graphs']} module graphs, {summary['nodes']} nodes{modules}")
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
