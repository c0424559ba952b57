"""``graphpatch-cache verify [KEY...]``: the loader's checks, the key proof, and rebuilds."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import click

from graphpatch_cache import show_progress
from graphpatch_cache.cache import Problem, check_node_tree

from .options import common_options, open_store, resolve_keys
from .output import emit_json, progress, progress_enabled

if TYPE_CHECKING:  # deferred below: verify without --rebuild runs without importing transformers
    from graphpatch_cache.cache import RebuildReport


@click.command(epilog="""\b
Checks every ref (of the given KEYs, or of the whole cache) as load_cached would: the ref
parses; its blob is present and has its sha256 digest; the artifact passes the loader's
checks (JSON Schema, closed allowlist, argument and structure rules); and the entry proves
it belongs to its key (the key material the ref records, with the artifact's model
structure, digests to the key, and the artifact agrees with it: model class, options,
signature, versions). Without --fix nothing on disk changes.

\b
--rebuild also extracts each variant again from the model config, example signature and
options its ref records (transformers models only; on the meta device, no weights, or on
the one CPU/GPU it was traced on) and compares the digests: a well-formed entry that
computes something else fails here. Nothing named by an entry is imported.
Exit status 1 when any entry fails, also with --fix (the entries were quarantined).

\b
--json prints:
  {"root": cache root, "checked": refs checked, "fixed": bool (--fix),
   "problems": [{"key": 64 hex digits, "variant": str, "kind": str, "path": file,
                 "message": str}, ...],
   "rebuilt": [{"key", "variant", "digest", "rebuilt_digest", "status": "match" |
                "differs" | "cannot-rebuild" | "invalid", "message", "seconds"}, ...]}
  (problem kinds: malformed-ref, missing-blob, corrupt-blob, invalid-artifact,
   wrong-key, unproven (no key material recorded), rebuild-differs, cannot-rebuild)

\b
Examples:
  graphpatch-cache verify
  graphpatch-cache verify 3fa9c1 --fix
  graphpatch-cache verify --rebuild 3fa9c1
""")
@click.argument("keys", nargs=-1, metavar="[KEY]...")
@click.option("--fix", is_flag=True, help="Quarantine bad entries (their keys become misses, rebuilt on use).")
@click.option("--rebuild", is_flag=True,
              help="Also extract each variant again (meta device) and compare digests (seconds per variant).")
@common_options
def verify(keys: Tuple[str, ...], fix: bool, rebuild: bool, cache_dir: Optional[Path], as_json: bool) -> None:
    """Check every entry (or the given KEYs): refs, digests, loader checks, key proof."""
    store = open_store(cache_dir)
    from graphpatch_cache.cache import check_rebuilds  # deferred: imports torch

    if keys:
        todo = resolve_keys(store, keys)
    else:
        todo = store.keys()
    problems: List[Problem] = []
    rebuilt: List[RebuildReport] = []
    checked = 0
    drawn = progress_enabled(as_json) and (len(todo) > 1 or rebuild)
    # a rebuild's own extraction progress would draw over this bar (and --json prints none)
    with progress("verifying", drawn) as bar, (show_progress(False) if drawn or as_json else contextlib.nullcontext()):
        for i, key in enumerate(todo):
            report = store.check([key], fix=fix, rebuild_check=check_node_tree)
            checked += report.checked
            problems += report.problems
            if rebuild:  # the variants that passed the other checks; a differing digest is a problem
                reports, found = check_rebuilds(store, key, skip={p.variant for p in report.problems}, fix=fix)
                rebuilt += reports
                problems += found
            bar(i + 1, len(todo))
    failed = len({(p.key, p.variant) for p in problems})
    if as_json:
        out: Dict[str, Any] = {
            "root": str(store.root), "checked": checked, "fixed": fix,
            "problems": [{"key": p.key, "variant": p.variant, "kind": p.kind, "path": p.path, "message": p.message}
                         for p in problems]}
        if rebuild:
            out["rebuilt"] = [{"key": r.key, "variant": r.variant, "digest": r.digest, "rebuilt_digest": r.rebuilt_digest,
                               "status": r.status, "message": r.message, "seconds": round(r.seconds, 3)}
                              for r in rebuilt]
        emit_json(out)
    else:
        for r in rebuilt:
            if r.ok:
                click.echo(f"{r.key[:12]}  {r.variant}  rebuilt: digest matches ({r.seconds:.1f} s)")
        for p in problems:
            click.echo(f"{p.key[:12]}  {p.message}  ({p.path})")
        if problems:
            action = "quarantined" if fix else "run `graphpatch-cache verify --fix` to quarantine them"
            if fix and any(p.kind == "cannot-rebuild" for p in problems):
                action = "quarantined those found bad (entries that cannot be rebuilt here are kept)"
            click.echo(f"{failed} of {checked} entries failed; {action}")
        else:
            click.echo(f"{checked} entries OK" + (", each rebuilt with the stored digest" if rebuild else ""))
    if problems:
        click.get_current_context().exit(1)


__all__ = ["verify"]
