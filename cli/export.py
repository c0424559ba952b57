"""``graphpatch-cache export KEY -o FILE`` and ``import FILE``: one portable file per key.

The file is the library's portable format (``portable_to_bytes``: every graph variant of
the key, pure data, never weights) with one more top-level field, ``key``, since a key
cannot be recomputed without the model::

    {"format": "graphpatch-cache-portable", "key": "<64 hex digits>", "artifacts": [...]}

``PatchableGraph.load(FILE, model)`` reads it as well (it ignores ``key``); ``import`` also
takes a file without a key (from ``pg.save()``) when ``--key`` is given.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import click

from graphpatch_cache.files import write_atomic

from .options import common_options, open_store
from .output import emit_json, human_size, note

_KEY = re.compile(r"^[0-9a-f]{64}$")


def export_bytes(key: str, artifacts: List[Any]) -> bytes:
    from graphpatch_cache.artifact import portable_to_bytes

    return portable_to_bytes(artifacts, key=key)


@click.command(epilog="""\b
File format: {"format": "graphpatch-cache-portable", "key": KEY, "artifacts": [...]}
(JSON; see cache_schema/SPEC.md). PatchableGraph.load(FILE, model) reads it too.

\b
--json prints:
  {"key": 64 hex digits, "file": path, "variants": int, "size": bytes}

\b
Examples:
  graphpatch-cache export 3fa9c1 -o llama-7b.graphs.json
  graphpatch-cache export 3fa9c1 -o - | ssh gpu-box graphpatch-cache import -
""")
@click.argument("key")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="File to write ('-' for stdout).")
@common_options
def export(key: str, output: str, cache_dir: Optional[Path], as_json: bool) -> None:
    """Write every graph variant of KEY to one portable file."""
    from graphpatch_cache import CacheMissError

    store = open_store(cache_dir)
    key = store.resolve(key)
    artifacts = []
    for entry in store.variants(key):
        artifact = store.load_entry(entry)
        if artifact is None:
            raise CacheMissError(f"a graph variant of key {key[:12]} is missing or damaged", path=entry.ref_path,
                                 hint="run `graphpatch-cache verify --fix`, then build it again")
        artifacts.append(artifact)
    if not artifacts:
        raise CacheMissError(f"key {key[:12]} has no graph variants", path=str(store.root))
    data = export_bytes(key, artifacts)
    if output == "-":
        if as_json:
            raise click.UsageError("--json and -o - both write to stdout; pick one")
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    write_atomic(Path(output), data)
    if as_json:
        emit_json({"key": key, "file": output, "variants": len(artifacts), "size": len(data)})
    else:
        click.echo(f"exported {key[:12]} ({len(artifacts)} variant{'s' if len(artifacts) != 1 else ''}, "
                   f"{human_size(len(data))}) to {output}")


@click.command("import", epilog="""\b
The file is validated (JSON Schema of every artifact, schema version) before anything is
stored. Graphs from other torch/transformers versions are stored under their own key and
only ever used by matching environments.

\b
--json prints:
  {"key": 64 hex digits, "root": cache root, "matches_environment": bool,
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
    from graphpatch_cache import ArtifactFormatError
    from graphpatch_cache.validate import read_portable
    from graphpatch_cache.cache import environment_fingerprint

    data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    name = "<stdin>" if file == "-" else file
    artifacts = read_portable(data, name)  # validates; raises ArtifactFormatError naming the file
    key = key_option
    if key is None:
        payload = json.loads(data)
        key = payload.get("key") if isinstance(payload, dict) else None
        if key is None:
            raise ArtifactFormatError(f"{name} holds no cache key (a file written by pg.save()?)", path=name,
                                      hint="pass --key with the full key, or export it with `graphpatch-cache export`")
    if not isinstance(key, str) or not _KEY.match(key.lower()):
        raise ArtifactFormatError(f"{name}: {key!r} is not a cache key", path=name, hint="keys are 64 hex digits")
    key = key.lower()
    store = open_store(cache_dir)
    entries = [store.put(key, artifact) for artifact in artifacts]
    env = environment_fingerprint()
    matches = all(a.versions.get(k) == env.get(k) for a in artifacts for k in ("torch", "transformers", "python"))
    if as_json:
        variants: List[Dict[str, Any]] = [{"variant": e.variant, "digest": e.digest, "size": e.size} for e in entries]
        emit_json({"key": key, "root": str(store.root), "matches_environment": matches, "variants": variants})
        return
    click.echo(f"imported {key[:12]} ({len(entries)} variant{'s' if len(entries) != 1 else ''}) into {store.root}")
    if not matches:
        v = artifacts[0].versions
        note(f"Note: built with torch {v.get('torch')}, transformers {v.get('transformers')}, python {v.get('python')}; "
             f"this environment has torch {env.get('torch')}, transformers {env.get('transformers')}, "
             f"python {env.get('python')}, so load_cached() here will not use it")


__all__ = ["export", "export_bytes", "import_"]
