"""Frames (fx graphs per module call) to pure data: :class:`~graphpatch_cache.artifact.ModuleGraph`."""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Any, Dict

import torch
import torch.fx

from ..artifact import ModuleGraph, NodeData, encode_value
from ..errors import DisallowedTargetError, SerializationError
from ..integrations.bitsandbytes import stored_dtype
from ..trust import allowlist
from ..trust.allowlist import check_method, target_name
from .frames import Frame
from ..artifact.names import qualname


def _size(size: Any) -> Any:
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if getattr(expr, "is_number", False) else str(size)
    return int(size)


def describe_value(value: Any) -> Dict[str, Any]:
    """Shape/dtype metadata shown in node reprs; symbolic sizes are written as their symbol."""
    if isinstance(value, torch.Tensor):
        return {
            "shape": [_size(s) for s in value.shape],
            "dtype": str(stored_dtype(value)).removeprefix("torch."),
        }
    if isinstance(value, torch.SymInt):
        return {"type": "int"}
    if isinstance(value, (list, tuple)):
        return {"type": type(value).__name__, "items": [describe_value(v) for v in value]}
    if isinstance(value, dict) or (hasattr(value, "keys") and hasattr(value, "__getitem__")):
        try:
            return {"type": type(value).__name__, "fields": {str(k): describe_value(value[k]) for k in value.keys()}}
        except Exception:
            return {"type": type(value).__name__}
    if value is None:
        return {}
    return {"type": type(value).__name__}


_FRAME = re.compile(r'^File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$')
#: this package's own files: a frame there (the call markers' wrapper) is no model source
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


@functools.lru_cache(maxsize=4096)
def portable_file(path: str) -> str:
    """A traced file's path as every machine writes it: relative to the longest ``sys.path``
    entry that holds it (``transformers/models/gpt2/modeling_gpt2.py`` wherever the
    site-packages are), else its base name. Stored artifacts hold no path of the machine that
    wrote them, so two teammates' installs extract the same bytes (``verify --rebuild``
    compares digests)."""
    full = os.path.abspath(path)
    best = ""
    for entry in sys.path:
        root = os.path.join(os.path.abspath(entry or os.curdir), "")
        if full.startswith(root) and len(root) > len(best):
            best = root
    return full[len(best):].replace(os.sep, "/") if best else os.path.basename(full)


def _source(node: torch.fx.Node) -> str:
    """The innermost model source line of ``node``'s stack trace, as ``File "path", line N,
    in fn: code`` with a portable path; frames of this package (the call markers) are
    skipped."""
    trace = node.meta.get("stack_trace") or ""
    # Python 3.11+ adds caret lines (^^^^ / ~~~~) under the source line: skip them.
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip() and set(ln.strip()) - set("^~ ")]
    frames = [(m, lines[i + 1] if i + 1 < len(lines) else "") for i, ln in enumerate(lines)
              if (m := _FRAME.match(ln)) is not None]
    if not frames:
        return lines[-1] if lines else ""
    outside = [f for f in frames if not os.path.abspath(f[0]["file"]).startswith(_PACKAGE_DIR)]
    match, code = (outside or frames)[-1]
    return f'File "{portable_file(match["file"])}", line {match["line"]}, in {match["func"]}: {code}'


def _located(frame: Frame, exc: SerializationError) -> SerializationError:
    """Attach the module whose graph holds the offending node (extraction falls back to
    making that module opaque)."""
    exc.module = frame.module  # type: ignore[attr-defined]
    exc.module_path = frame.path  # type: ignore[attr-defined]
    return exc


def frame_to_data(frame: Frame, path: str = "") -> ModuleGraph:
    """Encode one frame and its children. ``path`` is the frame's node path (for errors)."""
    nodes = [_node_data(frame, node, f"{path}.{node.name}" if path else node.name) for node in frame.graph.nodes]
    children = [frame_to_data(c, f"{path}.{c.local_name}" if path else c.local_name) for c in frame.children]
    try:
        code = frame.graph.python_code("self").src
    except Exception:  # code is for humans; never fail extraction over it
        code = ""
    return ModuleGraph(
        name=frame.local_name,
        module_path=frame.path,
        module_class=qualname(type(frame.module)),
        kind=frame.kind,
        call_index=0 if frame.record is None else frame.record.index,
        nodes=nodes,
        children=children,
        attributes=dict(frame.attrs),
        input_spec=frame.input_spec if frame.kind == "opaque" else None,
        code=code,
    )


def _node_data(frame: Frame, node: torch.fx.Node, where: str) -> NodeData:
    """One node as data; ``where``: its node path (for errors)."""
    target = _target(frame, node, where)

    def name_of(v: Any) -> Any:
        return v.name if isinstance(v, torch.fx.Node) else None

    try:
        args = encode_value(tuple(node.args), name_of, target_name)
        kwargs = encode_value(dict(node.kwargs), name_of, target_name)
    except SerializationError as exc:
        raise _located(frame, SerializationError(
            f"node {where!r} has an argument that cannot be stored: {exc.message}", node_path=where
        )) from exc
    meta = describe_value(node.meta.get("example_value"))
    if node.op == "output" and node.meta.get("graphpatch_extras"):
        meta["extras"] = node.meta["graphpatch_extras"]  # output is (value, extra values)
    if node.op == "placeholder" and node.meta.get("graphpatch_input"):
        meta["input"] = list(node.meta["graphpatch_input"])  # [parameter, key, ...]: path aliases
    source = _source(node)
    if source:
        meta["source"] = source
    return NodeData(name=node.name, op=node.op, target=target, args=args, kwargs=kwargs, meta=meta)


def _target(frame: Frame, node: torch.fx.Node, where: str) -> str:
    """The node's target as stored: an allowlisted function or method name, else its str."""
    if node.op == "call_function":
        try:
            target = target_name(node.target)
        except SerializationError as exc:
            raise _located(frame, SerializationError(
                f"node {where!r} calls {node.target!r}, which cannot be stored as data: {exc.message}",
                node_path=where,
                target=repr(node.target),
                hint="register the function with graphpatch_cache.register_target, or keep the "
                "module opaque with ExtractionOptions(classes_to_skip_compiling=...)",
            )) from exc
        if target == "builtins.getattr" and not (len(node.args) == 2 and isinstance(node.args[1], str)
                                                 and allowlist.attribute_allowed(node.args[1])):
            raise _located(frame, DisallowedTargetError(
                f"node {where!r} reads attribute {node.args[1:]!r}, which graphs may not read",
                node_path=where, target="builtins.getattr",
                hint="add the attribute to cache_schema/allowlist-v1.json after review, or keep the module "
                "opaque with ExtractionOptions(classes_to_skip_compiling=...)"))
        return target
    if node.op == "call_method":
        try:
            return check_method(node.target, node_path=where)
        except SerializationError as exc:
            raise _located(frame, exc) from None
    return str(node.target)


__all__ = ["portable_file", "describe_value", "frame_to_data"]
