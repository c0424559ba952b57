"""``graphpatch-cache gc``: remove old entries and keep the cache under a size."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from .options import DURATION, SIZE, common_options, open_store
from .output import emit_json, human_size, progress, progress_enabled


@click.command(epilog="""\b
Removes entries created more than --older-than ago, then the oldest entries until the
cache holds at most --max-size; also unreferenced blobs and writes abandoned for a day.
Durations: 45s, 90m, 12h, 30d, 2w. Sizes: 500MB, 5GB, 2GiB (powers of 1024).
Safe while others use the cache: a removed entry is a miss, rebuilt on next use.

\b
--json prints:
  {"root": cache root, "dry_run": bool,
   "removed": ["<key>/<variant>", ...], "freed_bytes": int, "kept_bytes": int}

\b
Examples:
  graphpatch-cache gc --older-than 30d
  graphpatch-cache gc --max-size 5GB --dry-run
""")
@click.option("--older-than", type=DURATION, default=None, metavar="DURATION",
              help="Remove entries created longer ago than this (e.g. 30d).")
@click.option("--max-size", type=SIZE, default=None, metavar="SIZE",
              help="Then remove the oldest entries until the cache holds at most this (e.g. 5GB).")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@common_options
def gc(older_than: Optional[float], max_size: Optional[int], dry_run: bool, cache_dir: Optional[Path],
       as_json: bool) -> None:
    """Remove old entries, and the oldest beyond a size budget."""
    store = open_store(cache_dir)
    with progress("removing", progress_enabled(as_json)) as bar:
        report = store.gc(older_than=older_than, max_bytes=max_size, dry_run=dry_run, progress=bar)
    if as_json:
        emit_json({"root": str(store.root), "dry_run": report.dry_run, "removed": list(report.removed),
                   "freed_bytes": report.freed_bytes, "kept_bytes": report.kept_bytes})
        return
    verb = "would remove" if dry_run else "removed"
    for item in report.removed:
        click.echo(f"{verb} {item[:12]}{item[64:]}")
    click.echo(f"{verb} {len(report.removed)} entries ({human_size(report.freed_bytes)}); "
               f"{human_size(report.kept_bytes)} {'would remain' if dry_run else 'remain'} in {store.root}")


__all__ = ["gc"]
