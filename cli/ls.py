"""``graphpatch-cache ls``: the entries in the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import click

from graphpatch_cache.cache import CacheEntry, CacheStore, entry_dtype

from .options import common_options, open_store
from .output import emit_json, human_size, iso_time, local_time, short_class, table


def describe(store: CacheStore, entry: CacheEntry) -> Dict[str, Any]:
    """One entry as ``ls --json`` prints it (the dtype comes from the verified blob)."""
    intact, dtype, quantization = entry_dtype(store, entry)
    return {
        "key": entry.key,
        "variant": entry.variant,
        "digest": entry.digest,
        "model_class": entry.model_class,
        "dtype": dtype,
        "quantization": quantization,
        "size": entry.size,
        "created": iso_time(entry.created),
        "versions": dict(entry.versions),
        "intact": intact,
    }


@click.command(epilog="""\b
--json prints:
  {"root": cache root,
   "entries": [{"key": 64 hex digits, "variant": str, "digest": sha256 of the artifact,
                "model_class": qualified class name, "dtype": "float16" | null,
                "quantization": null | "8bit", "size": bytes,
                "created": "2025-01-31T12:00:00Z" (UTC),
                "versions": {"torch": ..., "transformers": ..., "python": ...,
                             "graphpatch_cache": ...},
                "intact": false when the blob is missing or corrupt}, ...]}
  newest first. One entry per graph variant: a key may have several.

\b
Examples:
  graphpatch-cache ls
  graphpatch-cache ls --json | jq -r '.entries[].key'
""")
@common_options
def ls(cache_dir: Optional[Path], as_json: bool) -> None:
    """List the cached graphs: key prefix, model, dtype, size, created, versions."""
    store = open_store(cache_dir)
    entries = sorted(store.entries(), key=lambda e: (-e.created, e.key, e.variant))
    rows: List[Dict[str, Any]] = [describe(store, e) for e in entries]
    if as_json:
        emit_json({"root": str(store.root), "entries": rows})
        return
    if not rows:
        click.echo(f"no entries in {store.root}")
        return
    table(
        ["KEY", "MODEL", "DTYPE", "SIZE", "CREATED", "TORCH", "TRANSFORMERS"],
        [
            [
                row["key"][:12],
                short_class(row["model_class"]),
                (row["dtype"] or "?") + (" 8-bit" if row["quantization"] else "") + ("" if row["intact"] else " (damaged)"),
                human_size(row["size"]),
                local_time(entry.created),
                row["versions"].get("torch", "?"),
                row["versions"].get("transformers") or "-",
            ]
            for row, entry in zip(rows, entries)
        ],
    )
    total = sum(r["size"] for r in rows)
    click.echo(f"{len(rows)} entries, {human_size(total)} in {store.root}", err=True)


__all__ = ["describe", "ls"]
