"""``graphpatch-cache verify [KEY...]``: digest, schema and rebuild checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click

from .options import common_options, open_store, resolve_keys
from .output import emit_json, progress, progress_enabled


def rebuild_check(artifact: Any) -> None:
    """What loading the artifact would refuse, short of binding a model (the artifact does
    not hold the config a meta model needs): every call target resolves through the
    allowlist, every method is a public Tensor method, and the node-path tree builds.

    :raises GraphPatchCacheError: naming the node.
    """
    from graphpatch_cache import NodePath
    from graphpatch_cache.validate import check_artifact

    check_artifact(artifact)
    NodePath.from_graph(artifact.root)


@click.command(epilog="""\b
Checks each entry's blob: present, sha256 digest matches, JSON valid against the artifact
schema (cache_schema/), every call target allowed, node tree builds.
Exit status 1 when any entry fails, also with --fix (the entries were quarantined).

\b
--json prints:
  {"root": cache root, "checked": entries checked, "fixed": bool (--fix),
   "problems": [{"key": 64 hex digits, "path": file, "message": str}, ...]}

\b
Examples:
  graphpatch-cache verify
  graphpatch-cache verify 3fa9c1 --fix
""")
@click.argument("keys", nargs=-1, metavar="[KEY]...")
@click.option("--fix", is_flag=True, help="Quarantine bad entries (their keys become misses, rebuilt on use).")
@common_options
def verify(keys: Tuple[str, ...], fix: bool, cache_dir: Optional[Path], as_json: bool) -> None:
    """Check every entry (or the given KEYs): digest, schema, rebuild."""
    store = open_store(cache_dir)
    if keys:
        todo = resolve_keys(store, keys)
    else:
        todo = sorted({e.key for e in store.entries()})
    problems: List[Any] = []
    checked = 0
    with progress("verifying", progress_enabled(as_json) and len(todo) > 1) as bar:
        for i, key in enumerate(todo):
            checked += len(store.variants(key))
            problems += store.verify([key], fix=fix, rebuild_check=rebuild_check)
            bar(i + 1, len(todo))
    if as_json:
        report: Dict[str, Any] = {"root": str(store.root), "checked": checked, "fixed": fix,
                                  "problems": [{"key": p.key, "path": p.path, "message": p.message} for p in problems]}
        emit_json(report)
    else:
        for p in problems:
            click.echo(f"{p.key[:12]}  {p.message}  ({p.path})")
        if problems:
            action = "quarantined" if fix else "run `graphpatch-cache verify --fix` to quarantine them"
            click.echo(f"{len(problems)} of {checked} entries failed; {action}")
        else:
            click.echo(f"{checked} entries OK")
    if problems:
        click.get_current_context().exit(1)


__all__ = ["rebuild_check", "verify"]
