"""``graphpatch-cache info``: the versions that enter the key, and where the cache lives."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional

import click

from graphpatch_cache.cache import SUPPORTED_SCHEMA_VERSIONS, environment_fingerprint

from .options import common_options, open_store
from .output import emit_json, human_size


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@click.command(epilog="""\b
--json prints:
  {"environment": {"schema_version": int, "graphpatch_cache": str, "python": str,
                   "torch": str, "transformers": str | null},
   "when_used": {"accelerate": str | null, "bitsandbytes": str | null},
   "supported_schema_versions": [int, ...],
   "cache": {"root": path, "root_from": "--cache-dir" | "GRAPHPATCH_CACHE_DIR" | "default",
             "local": path | null, "local_from": "GRAPHPATCH_CACHE_LOCAL_DIR" | "default",
             "entries": int, "size": bytes}}

\b
Examples:
  graphpatch-cache info
  graphpatch-cache info --json | jq .environment
""")
@common_options
def info(cache_dir: Optional[Path], as_json: bool) -> None:
    """Show the environment fingerprint (versions in every key) and the cache roots.

    Two machines share cache entries only when their environment lines match. accelerate and
    bitsandbytes enter the key only of models that use them (offloaded or 8-bit).
    """
    store = open_store(cache_dir)
    entries = store.entries()
    data: Dict[str, Any] = {
        "environment": environment_fingerprint(),
        "when_used": {"accelerate": _version("accelerate"), "bitsandbytes": _version("bitsandbytes")},
        "supported_schema_versions": list(SUPPORTED_SCHEMA_VERSIONS),
        "cache": {
            "root": str(store.root),
            "root_from": "--cache-dir" if cache_dir is not None
            else "GRAPHPATCH_CACHE_DIR" if os.environ.get("GRAPHPATCH_CACHE_DIR") else "default",
            "local": str(store.local.directory) if store.local is not None else None,
            "local_from": "GRAPHPATCH_CACHE_LOCAL_DIR" if os.environ.get("GRAPHPATCH_CACHE_LOCAL_DIR") else "default",
            "entries": len(entries),
            "size": sum(e.size for e in entries),
        },
    }
    if as_json:
        emit_json(data)
        return
    click.echo("environment (enters every key):")
    for name, value in data["environment"].items():
        click.echo(f"  {name:<17} {value if value is not None else '-'}")
    click.echo("only for models that use them:")
    for name, value in data["when_used"].items():
        click.echo(f"  {name:<17} {value or '-'}")
    cache = data["cache"]
    click.echo("cache:")
    click.echo(f"  {'root':<17} {cache['root']}  (from {cache['root_from']})")
    click.echo(f"  {'local tier':<17} {cache['local'] or '-'}  (from {cache['local_from']})")
    click.echo(f"  {'entries':<17} {cache['entries']} ({human_size(cache['size'])})")


__all__ = ["info"]
