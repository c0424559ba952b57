"""``graphpatch-cache export KEY -o FILE`` and ``import FILE``: one portable file per key.

The file is the library's portable format (``portable_to_bytes``: every graph variant of
the key, pure data, never weights, and the ``sha256`` of the artifacts list) with two more
top-level fields: ``key``, since a key cannot be recomputed without the model, and
``provenance``, what each variant's ref records (the key material, less the module/tensor
lists, and the example signature), so the importing cache can prove the graphs belong to
the key and rebuild them::

    {"format": "graphpatch-cache-portable", "key": "<64 hex digits>", "sha256": "...",
     "artifacts": [...], "provenance": [{"material": {...}, "example": {...}}, ...]}

``PatchableGraph.load(FILE, model)`` reads it as well (it ignores ``key`` and
``provenance``). ``import`` checks everything the loader checks, and the proof, before it
stores anything; it also takes a file without a key (from ``pg.save()``) when ``--key`` is
given: such entries record no key material, so ``verify`` reports them as unproven.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import click

from graphpatch_cache.cache import environment_fingerprint

from .options import common_options, open_store, resolve_key
from .output import emit_json, human_size, note


@click.command(epilog="""\b
File format: {"format": "graphpatch-cache-portable", "key": KEY, "sha256": digest of the
artifacts, "artifacts": [...], "provenance": [...]} (JSON; see cache_schema/SPEC.md).
PatchableGraph.load(FILE, model) reads it too. Entries that fail `verify` are not exported.
KEY is a key, a unique prefix, or a MODEL as `build` takes it (default model options).

\b
--json prints:
  {"key": 64 hex digits, "file": path, "variants": int, "size": bytes}

\b
Examples:
  graphpatch-cache export 3fa9c1 -o llama-7b.graphs.json
  graphpatch-cache export tiny-gpt2 -o tiny.graphs.json
  graphpatch-cache export 3fa9c1 -o - | ssh gpu-box graphpatch-cache import -
""")
@click.argument("key")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="File to write ('-' for stdout).")
@common_options
def export(key: str, output: str, cache_dir: Optional[Path], as_json: bool) -> None:
    """Write every graph variant of KEY to one portable file."""
    store = open_store(cache_dir)
    key = resolve_key(store, key)
    from graphpatch_cache.cache import export_portable  # deferred: imports torch

    data = export_portable(store, key, None if output == "-" else Path(output))  # written atomically
    variants = len(store.variants(key))
    if output == "-":
        if as_json:
            raise click.UsageError("--json and -o - both write to stdout; pick one")
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    if as_json:
        emit_json({"key": key, "file": output, "variants": variants, "size": len(data)})
    else:
        click.echo(f"exported {key[:12]} ({variants} variant{'s' if variants != 1 else ''}, "
                   f"{human_size(len(data))}) to {output}")


@click.command("import", epilog="""\b
Before anything is stored, the file is checked as the loader checks it (its sha256, JSON
Schema, schema version, closed allowlist, argument and structure rules) and each graph must
prove it belongs to the key (the provenance `export` writes). Nothing is stored from a file
that fails. Graphs from other torch/transformers versions are stored under their own key
and only ever used by matching environments.

\b
--json prints:
  {"key": 64 hex digits, "root": cache root, "matches_environment": bool,
   "proven": bool (every graph carried key material proving it belongs to the key),
   "variants": [{"variant": str, "digest": sha256, "size": bytes}, ...]}

\b
Examples:
  graphpatch-cache import llama-7b.graphs.json
  graphpatch-cache import saved-by-pg.json --key 3fa9c1...  (a full 64-digit key)
""")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--key", "key_option", default=None,
              help="Store under this full key (for files written by pg.save(), which hold none).")
@common_options
def import_(file: str, key_option: Optional[str], cache_dir: Optional[Path], as_json: bool) -> None:
    """Store the graphs in FILE (written by `export`) in the cache, under its key."""
    data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    name = "<stdin>" if file == "-" else file
    store = open_store(cache_dir)
    from graphpatch_cache.cache import import_portable  # deferred: imports torch

    result = import_portable(store, data, name, key_option)  # checks everything first; stores nothing on failure
    key, entries, artifacts = result.key, result.entries, result.artifacts
    env = environment_fingerprint()
    matches = result.matches_environment
    if as_json:
        variants: List[Dict[str, Any]] = [{"variant": e.variant, "digest": e.digest, "size": e.size} for e in entries]
        emit_json({"key": key, "root": str(store.root), "matches_environment": matches,
                   "proven": result.proven, "variants": variants})
        return
    click.echo(f"imported {key[:12]} ({len(entries)} variant{'s' if len(entries) != 1 else ''}) into {store.root}")
    if not result.proven:
        note("Note: the file records no key material for some graphs (written by pg.save()?), so nothing shows "
             "they belong to this key: `verify` reports them; load_cached() checks them against the model")
    if not matches:
        v = artifacts[0].versions
        note(f"Note: built with torch {v.get('torch')}, transformers {v.get('transformers')}, python {v.get('python')}; "
             f"this environment has torch {env.get('torch')}, transformers {env.get('transformers')}, "
             f"python {env.get('python')}, so load_cached() here will not use it")


__all__ = ["export", "import_"]
