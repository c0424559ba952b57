"""What the extraction hooks record of one eager module call, and how its input leaves are named.

A :class:`CallRecord` keeps a call's input and output structure (pytree specs, non-tensor
leaves, tensor metadata) and its place in the call tree; the splitter rebuilds each call's
graph from it. :func:`leaf_names` and :func:`leaf_locations` name the input leaves after the
forward's parameters (placeholder names and their node-path aliases).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import _compat


@dataclass
class TensorMeta:
    shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    stride: Tuple[int, ...]


@dataclass
class CallRecord:
    """One eager call of one module, as seen by the hooks."""

    index: int
    tag: str
    module: torch.nn.Module
    parent: Optional[int]
    input_spec: Any = None
    input_names: List[str] = field(default_factory=list)  # one per leaf
    input_locations: List[List[Any]] = field(default_factory=list)  # one per leaf (leaf_locations)
    input_leaves: List[Any] = field(default_factory=list)  # non-tensor leaves; None for tensors
    input_is_tensor: List[bool] = field(default_factory=list)
    output_spec: Any = None
    output_leaves: List[Any] = field(default_factory=list)
    output_is_tensor: List[bool] = field(default_factory=list)
    output_meta: List[Optional[TensorMeta]] = field(default_factory=list)
    children: List[int] = field(default_factory=list)
    #: whether the output holds a key/value cache object
    returns_cache: bool = False
    #: the actual (args, kwargs), kept only for calls made by an opaque module (they are
    #: extracted separately, so that an opaque module's children still compile) and for an
    #: opaque module's own calls (their real values answer data questions of the fake run)
    inputs: Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]] = None


def int_positions(record: CallRecord) -> List[int]:
    """Positions of the call's int leaves (bools aside), in order: the leaves the opaque
    marker passes as ``ints`` (see ``markers.Recorder._opaque_call``)."""
    return [i for i, (c, t) in enumerate(zip(record.input_leaves, record.input_is_tensor))
            if not t and isinstance(c, int) and not isinstance(c, bool)]


def _key_str(key: Any) -> str:
    for attr in ("idx", "key", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_names(forward: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[str]:
    """A readable name for each pytree leaf of ``(args, kwargs)``: the forward's parameter
    name, then the path inside nested containers (``past_0_1``)."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_pos = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), "args")
    names = []
    for path, _ in _compat.tree_flatten_with_path((args, kwargs))[0]:
        parts = [_key_str(k) for k in path]
        if parts[0] == "0":
            i = int(parts[1])
            head = positional[i] if i < len(positional) else f"{var_pos}_{i - len(positional)}"
        else:
            head = parts[1]
        names.append("_".join([head] + parts[2:]))
    return names


def leaf_locations(forward: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[List[Any]]:
    """Where each pytree leaf of ``(args, kwargs)`` sits in the forward's signature:
    ``[parameter name, key, ...]``, with an int per sequence index and a str per mapping key or
    attribute. Leaves of ``*foos`` are ``["foos", i]`` and of ``**bars`` ``["bars", key]``, as
    graphpatch names them (``foos|sub_0``, ``bars|a``); the runtime offers these as aliases of
    the placeholders, whose names (``foos``, ``a``) :func:`leaf_names` gives."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_pos = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), None)
    var_kw = next((p.name for p in params if p.kind == p.VAR_KEYWORD), None)
    out: List[List[Any]] = []
    for path, _ in _compat.tree_flatten_with_path((args, kwargs))[0]:
        keys: List[Any] = [k.idx if hasattr(k, "idx") else _key_str(k) for k in path]
        if keys[0] == 0:
            i = int(keys[1])
            if i < len(positional):
                head: List[Any] = [positional[i]]
            elif var_pos is not None:
                head = [var_pos, i - len(positional)]
            else:
                head = ["args", i]
        else:
            name = str(keys[1])
            head = [var_kw, name] if var_kw is not None and name not in named else [name]
        out.append(head + keys[2:])
    return out


__all__ = ["CallRecord", "TensorMeta", "int_positions", "leaf_locations", "leaf_names"]
