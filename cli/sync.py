"""``graphpatch-cache sync SRC DST``: copy entries between two cache roots."""

from __future__ import annotations

from typing import Any, Dict, Tuple

import click

from graphpatch_cache.cache import CacheStore, sync as sync_roots

from .options import json_option, resolve_keys, verbose_option
from .output import emit_json, human_size, note


def _root(text: str) -> CacheStore:
    # no local tier: sync reads and writes the roots themselves (a local tier would only hold
    # copies of what it moves)
    return CacheStore(text, local_dir=False)


@click.command(epilog="""\b
SRC and DST are cache roots: directories, or URLs such as s3://bucket/prefix (the [s3]
extra; endpoint and credentials the backend's usual way, e.g. AWS_ENDPOINT_URL_S3 and
AWS_PROFILE). Every blob is read from SRC and its sha256 verified before it is written to
DST, blob first, then its ref; an entry DST already has (same variant, same digest, blob
present) is skipped; a damaged SRC entry is reported and not copied (exit status 1).

\b
--json prints:
  {"src": root, "dst": root, "dry_run": bool, "copied": ["key/variant", ...],
   "skipped": ["key/variant", ...], "copied_bytes": int,
   "problems": [{"key": str, "variant": str, "kind": str, "path": str, "message": str}, ...]}

\b
Examples:
  graphpatch-cache sync ~/.cache/graphpatch-cache/store s3://team-bucket/graphs
  graphpatch-cache sync s3://team-bucket/graphs ./store --key 3fa9c1
""")
@click.argument("src")
@click.argument("dst")
@click.option("--key", "keys", multiple=True, metavar="KEY", help="Only this key (a unique prefix will do); repeatable.")
@click.option("--dry-run", is_flag=True, help="Report what would be copied; write nothing.")
@json_option
@verbose_option
def sync(src: str, dst: str, keys: Tuple[str, ...], dry_run: bool, as_json: bool) -> None:
    """Copy the entries of the cache at SRC that the cache at DST lacks."""
    source, dest = _root(src), _root(dst)
    full = resolve_keys(source, keys) if keys else None
    report = sync_roots(source, dest, full, dry_run=dry_run)
    problems = [{"key": p.key, "variant": p.variant, "kind": p.kind, "path": p.path, "message": p.message}
                for p in report.problems]
    if as_json:
        data: Dict[str, Any] = {"src": str(source.root), "dst": str(dest.root), "dry_run": dry_run,
                                "copied": report.copied, "skipped": report.skipped,
                                "copied_bytes": report.copied_bytes, "problems": problems}
        emit_json(data)
    else:
        verb = "would copy" if dry_run else "copied"
        click.echo(f"{verb} {len(report.copied)} entr{'y' if len(report.copied) == 1 else 'ies'} "
                   f"({human_size(report.copied_bytes)}), skipped {len(report.skipped)} already in {dest.root}")
        for p in problems:
            note(f"not copied: {p['key'][:12]}/{p['variant']}: {p['message']} ({p['path']})")
    if report.problems:
        click.get_current_context().exit(1)


__all__ = ["sync"]
