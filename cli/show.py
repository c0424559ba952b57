"""``graphpatch-cache show KEY-or-MODEL [NODE_PATH]``: a cached graph's node tree, no weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click

from graphpatch_cache.cache import CacheEntry, CacheStore, node_tree
from graphpatch_cache.errors import CacheMissError

from .options import common_options, model_options, open_store, resolve_key
from .output import emit_json, note

def find_entry(store: CacheStore, target: str, model_args: Dict[str, Any]) -> Tuple[CacheEntry, Any]:
    """(entry, artifact) for a key prefix, or for MODEL built with ``model_args``.

    :raises CacheMissError: neither a key in the cache nor a model whose graph is cached.
    """
    key = resolve_key(store, target, model_args)
    entries = store.variants(key)
    for entry in entries:
        artifact = store.load_entry(entry)
        if artifact is not None:
            if len(entries) > 1:
                note(f"Note: key {key[:12]} has {len(entries)} graph variants; showing {entry.variant}")
            return entry, artifact
    raise CacheMissError(f"the graph under key {key[:12]} is missing or damaged", path=str(store.root),
                         hint="run `graphpatch-cache verify --fix`, then build it again")


def _nodes(node: Any, depth: Optional[int], grep: Optional[str]) -> List[Dict[str, Any]]:
    """The nodes below ``node`` as ``show --json`` lists them: the walk the tree draws."""
    out: List[Dict[str, Any]] = []
    for child, _level, _last in node._walk(depth, grep):
        shape = child._shape
        out.append({"path": str(child), "kind": "value" if child._is_value else "graph",
                    "shape": list(shape) if isinstance(shape, tuple) else shape})
    return out


def _codes_matching(entry: CacheEntry, node: Any, depth: Optional[int], pattern: str, as_json: bool) -> None:
    """``--code --grep PATTERN``: the code of every graph (a value: its source line) below
    ``node`` whose own path contains PATTERN."""
    found = [(str(child), child._is_value, child._code) for child, _level, _last in node._walk(depth, pattern)
             if pattern in str(child) and child._code]
    if as_json:
        emit_json({"key": entry.key, "variant": entry.variant, "path": str(node), "grep": pattern,
                   "codes": [{"path": path, "kind": "value" if is_value else "graph", "code": text}
                             for path, is_value, text in found]})
        return
    if not found:
        note(f"no node below {str(node) or '<root>'} with code has a path containing {pattern!r}")
    for i, (path, _is_value, text) in enumerate(found):
        click.echo(("\n" if i else "") + f"# {path}\n" + str(text).strip("\n"))


@click.command(epilog="""\b
--json prints:
  {"key": 64 hex digits, "variant": str, "path": NODE_PATH ("" for the root),
   "kind": "graph" | "value",
   "nodes": [{"path": node path, "kind": "graph" | "value",
              "shape": [sizes, symbolic ones as strings] | "description" | null}, ...]}
  with --code, "code": str instead of "nodes"; with --code and --grep, "grep": PATTERN and
  "codes": [{"path": node path, "kind": "graph" | "value", "code": str}, ...] (each node whose
  own path contains PATTERN).

\b
Examples:
  graphpatch-cache show tiny-gpt2 --depth 2
  graphpatch-cache show 3fa9c1 transformer.h_0.mlp
  graphpatch-cache show gpt2 --grep mlp.act
  graphpatch-cache show gpt2 transformer.h_0.attn --code
  graphpatch-cache show tiny-llama --grep down_proj --code
""")
@click.argument("target", metavar="KEY-or-MODEL")
@click.argument("node_path", required=False, default="")
@click.option("--depth", type=click.IntRange(min=0), default=None, help="Levels of the tree to print (default: all).")
@click.option("--grep", "pattern", default=None, metavar="PATTERN", help="Only branches whose node paths contain PATTERN.")
@click.option("--code", is_flag=True, help="Print the module's generated code (a value's source line); with --grep, of each matching node.")
@model_options
@common_options
def show(target: str, node_path: str, depth: Optional[int], pattern: Optional[str], code: bool, dtype: str,
         load_in_8bit: bool, batch_size: int, seq_len: int, attention_mask: bool, use_cache: bool,
         past_length: int, cache_dir: Optional[Path], as_json: bool) -> None:
    """Print a cached graph's node tree, as pg.graph prints it, without loading weights.

    KEY-or-MODEL is a key (or a unique prefix) or a MODEL as `build` takes it, with the same
    model options. NODE_PATH (e.g. transformer.h_0.mlp) picks a subtree; the paths printed
    are the ones pg.patch() takes.
    """
    store = open_store(cache_dir)
    model_args = {"dtype": dtype, "load_in_8bit": load_in_8bit, "batch_size": batch_size, "seq_len": seq_len,
                  "attention_mask": attention_mask, "use_cache": use_cache, "past_length": past_length}
    entry, artifact = find_entry(store, target, model_args)
    root = node_tree(artifact)
    node = root[node_path] if node_path else root
    if code and pattern is not None:
        _codes_matching(entry, node, depth, pattern, as_json)
        return
    if code:
        text = node._code
        if as_json:
            emit_json({"key": entry.key, "variant": entry.variant, "path": str(node),
                       "kind": "value" if node._is_value else "graph", "code": text})
        elif text:
            click.echo(text.strip("\n"))
        else:
            note(f"{str(node) or '<root>'} has no code")
        return
    if as_json:
        emit_json({"key": entry.key, "variant": entry.variant, "path": str(node),
                   "kind": "value" if node._is_value else "graph", "nodes": _nodes(node, depth, pattern)})
        return
    click.echo(node._tree(depth, pattern))


__all__ = ["find_entry", "show"]
