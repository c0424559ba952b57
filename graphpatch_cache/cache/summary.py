"""What an artifact holds, read without a model: counts, the parameters' dtype, whether its
node-path tree builds (what ``show`` and patching need), and which calls a variant serves
(:func:`call_shape`, read from its signature). The CLI's ``build``, ``ls``, ``show`` and
``verify`` print these. Nothing here imports torch (``ls`` answers at once)."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from ..artifact.format import parse_json
from ..errors import ArtifactFormatError
from .records import CacheEntry
from .store import CacheStore

if TYPE_CHECKING:  # deferred below: `ls` runs without torch
    from ..artifact import GraphArtifact
    from ..runtime import NodePath


def model_dtype(structure: Dict[str, Any]) -> Tuple[Optional[str], Optional[str]]:
    """(the parameters' dtype, ``"8bit"`` or ``None``) from an artifact's recorded structure
    (``extraction.structure``)."""
    counts = Counter(t[3] for t in structure.get("tensors", []) if t[0] == "param")
    quantization = "8bit" if counts.get("torch.int8") else None
    floats = [(n, d) for d, n in counts.items() if d != "torch.int8"]
    dtype = max(floats)[1].removeprefix("torch.") if floats else None
    return dtype, quantization


def artifact_summary(artifact: Union[GraphArtifact, Dict[str, Any]]) -> Dict[str, Any]:
    """Counts and dtype of an artifact (or of its decoded JSON payload): ``graphs`` (module
    graphs), ``nodes`` (in all graphs), ``modules`` (in the model, None when not recorded),
    ``dtype`` and ``quantization`` (see :func:`model_dtype`)."""
    data = artifact if isinstance(artifact, dict) else artifact.to_dict()
    graphs = nodes = 0
    stack: List[Dict[str, Any]] = [data["root"]]
    while stack:
        graph = stack.pop()
        graphs += 1
        nodes += len(graph["nodes"])
        stack.extend(graph["children"])
    structure = data.get("extraction", {}).get("structure") or {}
    dtype, quantization = model_dtype(structure)
    return {"graphs": graphs, "nodes": nodes, "modules": len(structure.get("modules", [])) or None,
            "dtype": dtype, "quantization": quantization}


def entry_dtype(store: CacheStore, entry: CacheEntry) -> Tuple[bool, Optional[str], Optional[str]]:
    """(whether the entry's blob is intact, its parameters' dtype, its quantization), from the
    shared root's verified blob without the full loader checks (``verify`` makes those).
    Changes nothing on disk: listing never quarantines (``verify`` then reports what it saw)."""
    data, _why = store._read_shared(entry.digest)
    if data is None:
        return False, None, None
    try:
        payload = parse_json(data, str(store._blob_path(entry.digest)))
        structure = payload.get("extraction", {}).get("structure") or {}
        dtype, quantization = model_dtype(structure)
    except (ArtifactFormatError, AttributeError, TypeError, IndexError, ValueError):
        return True, None, None  # intact bytes, not a readable artifact: `verify` reports it
    return True, dtype, quantization


def check_node_tree(artifact: GraphArtifact) -> None:
    """The node-path tree builds (what ``show`` and patching need), beyond what the loader's
    :func:`~graphpatch_cache.trust.validate.read_artifact` already checked; a check for
    :meth:`CacheStore.check`'s ``rebuild_check``.

    :raises GraphPatchCacheError: naming the node.
    """
    from ..runtime import NodePath  # deferred: imports torch

    NodePath.from_graph(artifact.root)


def node_tree(artifact: GraphArtifact) -> NodePath:
    """The artifact's node-path tree (paths as ``pg.graph`` has them), without a model."""
    from ..runtime import NodePath  # deferred: imports torch

    return NodePath.from_graph(artifact.root)


#: what a letter in a rendered call shape means (the fit rule: :func:`~graphpatch_cache.artifact.signature.dims_rule`)
FREE_SIZE = "any size of 2 or more (written b>=1: of 1 or more)"

#: the pytree type name of a key/value cache argument (:mod:`graphpatch_cache.integrations.kv_cache`)
_CACHE_TYPE = "graphpatch_cache.CacheState"


def printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (``\\x1b``): for text
    any root writer chose (a ref's ``origin``) before it reaches a terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _leaf_count(node: Dict[str, Any]) -> int:
    if node.get("type") is None:
        return 1
    return sum(_leaf_count(c) for c in node.get("children_spec") or [])


def _named_nodes(node: Dict[str, Any], name: str) -> List[Tuple[str, Dict[str, Any]]]:
    """(name, node) of each argument below ``node``: a leaf, a key/value cache, or ``None``
    (a container's items get ``name[i]``/``name[key]``)."""
    kind = node.get("type")
    if kind is None or kind == _CACHE_TYPE or kind == "builtins.NoneType":
        return [(name, node)]
    children = node.get("children_spec") or []
    keys: List[Any] = list(range(len(children)))
    if kind in ("builtins.dict", "collections.OrderedDict"):
        keys = list(json.loads(node.get("context") or "[]"))
    out: List[Tuple[str, Dict[str, Any]]] = []
    for k, child in zip(keys, children):
        out.extend(_named_nodes(child, f"{name}[{k!r}]" if name else str(k)))
    return out


def _cache_layers(context: Any) -> int:
    """Self-attention layers of a cache state's pytree context (see ``kv_cache``): a count,
    each layer's window, or ``["cross", self layers, cross layers]``."""
    if isinstance(context, list):
        return int(context[1]) if context and context[0] == "cross" else len(context)
    return int(context)


def _dims(dims: List[Any], names: Tuple[str, ...]) -> List[Any]:
    def name(i: int) -> str:
        return names[i] if i < len(names) and names[i] else f"n{i}"

    # "dyn1": the graph serves size 1 there too (see artifact.signature.dims_rule)
    return [name(i) if d == "dyn" else f"{name(i)}>=1" if d == "dyn1" else d for i, d in enumerate(dims)]


def call_shape(signature: Dict[str, Any]) -> Dict[str, Any]:
    """What calls a variant's signature serves, as data: ``kind`` (``forward``, ``prefill``:
    ``use_cache=True`` without a cache yet, ``decode``: a key/value cache of earlier positions
    is passed), ``inputs`` (per tensor ``name``, ``dtype``, ``dims``: a number is fixed, a
    letter (``b`` batch, ``s`` sequence, ``past`` cached positions) is free: :data:`FREE_SIZE`),
    ``constants`` (name: value), ``none`` (arguments passed as None), ``use_cache`` (True,
    False, or None: left out, the model's default) and ``cache`` (``layers``, ``dtype``,
    ``dims`` of a layer's keys) or None. A signature this release cannot read gives
    ``{"kind": "unknown"}``."""
    try:
        root = json.loads(signature["spec"])[1]
        args, kwargs = root["children_spec"]
        named = [(f"args[{i}]", n) for i, n in enumerate(args.get("children_spec") or [])]
        named += [(k, n) for k, n in zip(json.loads(kwargs.get("context") or "[]"), kwargs.get("children_spec") or [])]
        leaves = list(signature["leaves"])
        out: Dict[str, Any] = {"kind": "forward", "inputs": [], "constants": {}, "none": [], "cache": None}
        at = 0
        for top, node in named:
            for name, sub in _named_nodes(node, top):
                if sub.get("type") == "builtins.NoneType":
                    out["none"].append(name)
                    continue
                count = _leaf_count(sub)
                mine, at = leaves[at:at + count], at + count
                if sub.get("type") == _CACHE_TYPE:
                    first = next((x for x in mine if x.get("kind") == "tensor"), None)
                    out["cache"] = {"name": name, "layers": _cache_layers(json.loads(sub.get("context") or "0")),
                                    "dtype": first and first["dtype"],
                                    "dims": first and _dims(first["dims"], ("b", "", "past"))}
                elif mine[0]["kind"] == "tensor":
                    out["inputs"].append({"name": name, "dtype": mine[0]["dtype"],
                                          "dims": _dims(mine[0]["dims"], ("b", "s"))})
                else:
                    out["constants"][name] = mine[0]["value"]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RecursionError):
        return {"kind": "unknown"}
    out["use_cache"] = out["constants"].pop("use_cache", None)
    if out["cache"] is not None:
        out["kind"] = "decode"
    elif out["use_cache"] is True:
        out["kind"] = "prefill"
    return out


def describe_call_shape(signature: Dict[str, Any]) -> str:
    """:func:`call_shape` in one line, e.g. ``input_ids[b,s] int64, attention_mask[b,s]
    int64; use_cache: model default``, or ``...; use_cache=True; cache: decode (2 layers
    [b,2,past,8] float32)``."""
    shape = call_shape(signature)
    if shape["kind"] == "unknown":
        return "(a signature this release cannot read)"
    parts = [f"{t['name']}[{','.join(str(d) for d in t['dims'])}] {t['dtype']}" for t in shape["inputs"]]
    parts += [f"{k}={v!r}" for k, v in shape["constants"].items()] + [f"{k}=None" for k in shape["none"]]
    text = ", ".join(parts) or "no arguments"
    text += "; use_cache: model default" if shape["use_cache"] is None else f"; use_cache={shape['use_cache']!r}"
    cache = shape["cache"]
    if cache is not None:
        text += (f"; cache: decode ({cache['layers']} layer{'s' if cache['layers'] != 1 else ''} "
                 f"[{','.join(str(d) for d in cache['dims'] or [])}] {cache['dtype']})")
    elif shape["kind"] == "prefill":
        text += "; cache: prefill (makes a new one)"
    return printable(text)


__all__ = ["FREE_SIZE", "artifact_summary", "call_shape", "check_node_tree", "describe_call_shape", "entry_dtype",
           "model_dtype", "node_tree", "printable"]
