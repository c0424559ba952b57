"""``graphpatch-cache show KEY-or-MODEL [NODE_PATH]``: a cached graph's node tree, no weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import click

from graphpatch_cache.cache import CacheEntry, CacheStore, call_shape, describe_call_shape, node_tree, printable
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


def entry_info(store: CacheStore, entry: CacheEntry) -> Dict[str, Any]:
    """What the entry was built from and the calls each variant of its key serves (``show
    --json``'s ``origin`` and ``variants``)."""
    return {"origin": entry.origin,
            "variants": [{"variant": e.variant, "serves": describe_call_shape(e.signature),
                          "shape": call_shape(e.signature)} for e in store.variants(entry.key)]}


def _say_info(info: Dict[str, Any], shown: str) -> None:
    note(f"built from: {printable(info['origin']) if info['origin'] else '- (not recorded)'}")
    for v in info["variants"]:
        note(f"serves{' (shown)' if v['variant'] == shown else ''}: {v['serves']}")


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
   "origin": what the entry was built from | null (display text, never trusted),
   "variants": [{"variant": str, "serves": the calls it serves in words,
                 "shape": the call shape as data (see `ls --help`)}, ...],
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
    model options (none: its plain forward call). NODE_PATH (e.g. transformer.h_0.mlp) picks
    a subtree; the paths printed are the ones pg.patch() takes. For the whole tree, what the
    entry was built from and the calls its variants serve come first (on stderr).
    """
    store = open_store(cache_dir)
    model_args: Dict[str, Any] = {"dtype": dtype, "load_in_8bit": load_in_8bit, "batch_size": batch_size, "seq_len": seq_len,
                  "attention_mask": attention_mask, "use_cache": use_cache, "past_length": past_length}
    entry, artifact = find_entry(store, target, model_args)
    info = entry_info(store, entry)
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
                   "kind": "value" if node._is_value else "graph", **info, "nodes": _nodes(node, depth, pattern)})
        return
    if not node_path:
        _say_info(info, entry.variant)
    click.echo(node._tree(depth, pattern))


__all__ = ["find_entry", "show"]
