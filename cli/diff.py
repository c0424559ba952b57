"""``graphpatch-cache diff A B``: what moved between two versions of a model's graphs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click

from graphpatch_cache.cache import CacheStore
from graphpatch_cache.errors import CacheMissError

from .options import common_options, model_options, open_store, resolve_key
from .output import emit_json


def _side(store: CacheStore, target: str, model_args: Dict[str, Any]) -> Tuple[Any, Dict[str, Any]]:
    """(what diff_graphs takes, what the JSON says it was) for a file, key, prefix or MODEL."""
    if Path(target).is_file():  # a portable file (`export`, pg.save) is read through the loader's checks
        return target, {"target": target, "file": target}
    key = resolve_key(store, target, model_args)
    artifacts: List[Any] = []
    for entry in store.variants(key):
        artifact = store.load_entry(entry)
        if artifact is not None:
            artifacts.append(artifact)
    if not artifacts:
        raise CacheMissError(f"the graphs under key {key[:12]} are missing or damaged", path=str(store.root),
                             hint="run `graphpatch-cache verify --fix`, then build it again")
    return artifacts, {"target": target, "key": key}


@click.command(epilog="""\b
Nodes are matched by identity, as patches are moved between graph variants: op, target,
source line (without its line number) and occurrence; then ops of similar source lines (a
renamed local); module graphs by path, then by the module they call, then by class. Of
several graph variants, the first call signature both sides have is compared. Exit status 0
whether or not they differ.

\b
--json prints:
  {"a": {"target": A, "key": KEY | "file": FILE}, "b": {...},
   "compared": {"a": description, "b": description},
   "added": [node path, ...], "removed": [node path, ...] (a module graph once, by its path),
   "renamed": [{"old": path, "new": path}, ...],
   "modules": [{"path": path in B, "old_path": path in A, "old_class", "new_class",
                "added": [local name, ...], "removed": [local name, ...]}, ...],
   "shapes": [{"path": path in B, "old_path": path in A, "before": str, "after": str}, ...]}

\b
Examples:
  graphpatch-cache diff 3fa9c1 77d0e2
  graphpatch-cache diff old-llama.graphs.json tiny-llama --json
""")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@model_options
@common_options
def diff(a: str, b: str, dtype: str, load_in_8bit: bool, batch_size: int, seq_len: int, attention_mask: bool,
         use_cache: bool, past_length: int, cache_dir: Optional[Path], as_json: bool) -> None:
    """Node paths added, removed and renamed from A to B, modules whose structure changed,
    and shapes that changed.

    A and B are each a key (or a unique prefix), a MODEL as `build` takes it (with the same
    model options), or a portable file (from `export` or pg.save()).
    """
    store = open_store(cache_dir)
    model_args = {"dtype": dtype, "load_in_8bit": load_in_8bit, "batch_size": batch_size, "seq_len": seq_len,
                  "attention_mask": attention_mask, "use_cache": use_cache, "past_length": past_length}
    side_a, where_a = _side(store, a, model_args)
    side_b, where_b = _side(store, b, model_args)
    from graphpatch_cache import diff_graphs  # deferred: imports torch (the fast commands stay torch-free)

    result = diff_graphs(side_a, side_b)
    if as_json:
        data = result.to_dict()
        data["compared"] = {"a": data.pop("a"), "b": data.pop("b")}
        emit_json({"a": where_a, "b": where_b, **data})
        return
    click.echo(str(result))


__all__ = ["diff"]
