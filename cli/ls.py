"""``graphpatch-cache ls``: the entries in the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import click

from graphpatch_cache.cache import FREE_SIZE, CacheEntry, CacheStore, call_shape, describe_call_shape, entry_dtype, printable

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
        "origin": entry.origin,
        "serves": describe_call_shape(entry.signature),
        "shape": call_shape(entry.signature),
    }


def shown_origin(origin: Optional[str], width: int = 40) -> str:
    """An entry's ``origin`` for a table cell: escaped; when long, its kind (``directory: ``)
    and its end (a path's distinctive part) kept; ``-`` when the ref records none (older
    releases, imports)."""
    if not origin:
        return "-"
    text = printable(origin)
    if len(text) <= width:
        return text
    kind, sep, rest = text.partition(": ")
    head = kind + sep if sep and len(kind) < 12 else ""  # "directory: " stays: it says what the rest is
    return head + "..." + text[-(width - 3 - len(head)):]


@click.command(epilog="""\b
--json prints:
  {"root": cache root,
   "entries": [{"key": 64 hex digits, "variant": str, "digest": sha256 of the artifact,
                "model_class": qualified class name, "dtype": "float16" | null,
                "quantization": null | "8bit", "size": bytes,
                "created": "2025-01-31T12:00:00Z" (UTC),
                "versions": {"torch": ..., "transformers": ..., "python": ...,
                             "graphpatch_cache": ...},
                "intact": false when the blob is missing or corrupt,
                "origin": what it was built from ("preset: NAME", "directory: PATH",
                          "hub: ID", "python: load_cached", ...) | null (display text
                          that any writer of the root chose: never trusted),
                "serves": the calls it serves in words (CALLS),
                "shape": {"kind": "forward" | "prefill" | "decode" | "unknown",
                          "inputs": [{"name": str, "dtype": str,
                                      "dims": [int (fixed) | "b" | "s" | "past" | "nN"]}],
                          "constants": {name: value}, "none": [names passed as None],
                          "use_cache": true | false | null (left out: the model's default),
                          "cache": null | {"name": str, "layers": int, "dtype": str,
                                           "dims": [...]}}}, ...]}
  newest first. One entry per graph variant: a key may have several. In CALLS and
  "dims", a letter is a size the graphs leave free (b batch, s sequence, past cached
  positions: {FREE_SIZE}); a number is the only size served.

\b
Examples:
  graphpatch-cache ls
  graphpatch-cache ls --json | jq -r '.entries[].key'
  graphpatch-cache ls --json | jq -r '.entries[] | [.key[:12], .origin, .serves] | @tsv'
""".replace("{FREE_SIZE}", FREE_SIZE))
@common_options
def ls(cache_dir: Optional[Path], as_json: bool) -> None:
    """List the cached graphs: key prefix, model, what it was built from, dtype, size, created,
    versions, and the calls each variant serves."""
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
        ["KEY", "MODEL", "BUILT FROM", "DTYPE", "SIZE", "CREATED", "TORCH", "TRANSFORMERS", "CALLS"],
        [
            [
                row["key"][:12],
                short_class(row["model_class"]),
                shown_origin(row["origin"]),
                (row["dtype"] or "?") + (" 8-bit" if row["quantization"] else "") + ("" if row["intact"] else " (damaged)"),
                human_size(row["size"]),
                local_time(entry.created),
                row["versions"].get("torch", "?"),
                row["versions"].get("transformers") or "-",
                row["serves"],
            ]
            for row, entry in zip(rows, entries)
        ],
    )
    total = sum(r["size"] for r in rows)
    click.echo(f"{len(rows)} entries, {human_size(total)} in {store.root}", err=True)


__all__ = ["describe", "ls", "shown_origin"]
