"""``graphpatch-cache rm KEY``: remove entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click

from .options import common_options, open_store, resolve_keys
from .output import emit_json


@click.command(epilog="""\b
Removes every graph variant of each KEY (a unique prefix will do, or a MODEL as `build`
takes it, built with the default model options); blobs that other keys share are kept. Safe while others use the cache: a removed entry is a miss.

\b
--json prints:
  {"root": cache root, "removed": [{"key": 64 hex digits, "variants": int}, ...]}

\b
Examples:
  graphpatch-cache rm 3fa9c1
  graphpatch-cache rm tiny-gpt2
  graphpatch-cache rm $(graphpatch-cache ls --json | jq -r '.entries[].key')
""")
@click.argument("keys", nargs=-1, required=True, metavar="KEY...")
@common_options
def rm(keys: Tuple[str, ...], cache_dir: Optional[Path], as_json: bool) -> None:
    """Remove the entries of KEY (and of any further KEYs)."""
    store = open_store(cache_dir)
    full = resolve_keys(store, keys)  # all resolve before anything is removed
    removed: List[Dict[str, Any]] = [{"key": key, "variants": store.remove(key)} for key in full]
    if as_json:
        emit_json({"root": str(store.root), "removed": removed})
        return
    for item in removed:
        click.echo(f"removed {item['key'][:12]} ({item['variants']} variant{'s' if item['variants'] != 1 else ''})")


__all__ = ["rm"]
