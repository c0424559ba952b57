"""A frame: one module call being rebuilt as its own fx graph, and the graphs of calls not traced.

The splitter (:mod:`.split`) opens a :class:`Frame` per module call and fills compiled
frames from the flat dynamo graph. A call dynamo did not trace gets its graph here instead:
an opaque call (:func:`build_opaque`: one call of the original module), a leaf module
(:func:`build_leaf`: its handler's graph function) or a module with a user-supplied graph
(:func:`build_custom`). :func:`read_leaf` and :func:`size_node` add the nodes that read a
returned call's output and recompute a symbolic size inside a frame.
"""

from __future__ import annotations

import builtins
import contextlib
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx

from .. import _compat
from ..errors import ExtractionError, UnsupportedCacheError
from ..integrations import kv_cache
from ..trust.allowlist import resolve_function
from ..trust.functions import exposed_attributes, module_attribute, run_opaque
from .local_names import LocalNames, base_name, escape_name
from .records import CallRecord, int_positions

#: for an opaque frame: (call record, local name, module path) of a call the module makes itself
OpaqueCall = Tuple[CallRecord, str, str]


@dataclass
class Frame:
    """One module call being rebuilt as its own graph."""

    record: Optional[CallRecord]
    module: torch.nn.Module
    path: str  # qualified module name in the model
    local_name: str
    parent: Optional["Frame"]
    kind: str = "compiled"
    graph: torch.fx.Graph = field(default_factory=torch.fx.Graph)
    names: LocalNames = field(default_factory=LocalNames)
    env: Dict[torch.fx.Node, torch.fx.Node] = field(default_factory=dict)
    attrs: Dict[str, str] = field(default_factory=dict)  # local attr -> qualified name
    attr_nodes: Dict[str, torch.fx.Node] = field(default_factory=dict)
    hidden: List[torch.fx.Node] = field(default_factory=list)  # flat nodes supplied by parent
    inputs: List[torch.fx.Node] = field(default_factory=list)  # flat marker inputs
    children: List["Frame"] = field(default_factory=list)
    input_spec: Optional[str] = None
    #: the call_module node in the parent graph, once the call has returned
    call_node: Optional[torch.fx.Node] = None
    #: values returned besides the module's own output (see Splitter._export)
    extras: List[torch.fx.Node] = field(default_factory=list)
    #: for opaque frames: each call the module makes itself
    opaque_calls: List[OpaqueCall] = field(default_factory=list)


def build_opaque(frame: Frame, opaque_calls: List[OpaqueCall], fake_outputs: Any = None,
                 sizes: Sequence[Any] = ()) -> None:
    """An opaque call's graph: inputs, the module's parameters and buffers as nodes, its
    plain-data attributes as nodes read at call time, one call of the original module with
    them, and the structured output (its metadata from ``fake_outputs``, the opaque
    marker's fake tensor outputs). ``opaque_calls``: the calls the module makes itself.
    ``sizes``: the call's int leaves in order, a traced size as a node of the frame's graph
    (it replaces the example's value, so the call takes the size of each call)."""
    frame.kind = "opaque"
    record = frame.record
    assert record is not None
    if record.returns_cache or any(kv_cache.is_cache(x) or isinstance(x, kv_cache.CacheState)
                                   for x in record.input_leaves):
        # it would grow the cache object recorded at extraction, not the caller's, or
        # return a live cache object where the graph passes tensors
        raise UnsupportedCacheError(
            f"module {frame.path or '(the model)'!r} ({type(frame.module).__name__}) could not be traced "
            "and takes or returns the key/value cache, which an opaque call cannot pass through a graph",
            cache_class=type(frame.module).__name__,
            hint="call with use_cache=False, or make the module traceable (see "
            "ExtractionOptions(warn_on_compilation_failure=True) for why it is opaque)",
        )
    frame.opaque_calls = opaque_calls
    module_ref = frame.graph.get_attr("_graphpatch_module")
    module_ref.name = frame.names.exact("_graphpatch_module")
    tensors = _opaque_tensors(frame, record)
    attributes = _opaque_attributes(frame, module_ref)
    placeholders = [n for n in frame.graph.nodes if n.op == "placeholder"][:len(frame.inputs)]
    constants = list(record.input_leaves)
    for i, size in zip(int_positions(record), sizes):
        if isinstance(size, torch.fx.Node):
            constants[i] = size
    args = (module_ref, frame.input_spec, constants, record.input_is_tensor, placeholders, tensors)
    result = frame.graph.call_function(run_opaque, args + ((attributes,) if attributes else ()))
    result.name = frame.names.fresh("forward_output")
    out = frame.graph.output(result)
    if isinstance(fake_outputs, (list, tuple)):
        # the output's structure with the fake tensors (symbolic sizes) in it: `_shape`
        # of the output and of its parts, as for compiled graphs
        fakes = iter(fake_outputs)
        leaves = [next(fakes, None) if is_t else leaf for leaf, is_t in zip(record.output_leaves, record.output_is_tensor)]
        value = _compat.tree_unflatten(leaves, record.output_spec)
        result.meta["example_value"] = out.meta["example_value"] = value


def _opaque_tensors(frame: Frame, record: CallRecord) -> Dict[str, torch.fx.Node]:
    """``get_attr`` nodes for the module's parameters and buffers, by qualified name."""
    tensors = {}
    # Children called by the module are extracted on their own and own their tensors;
    # the opaque graph then exposes only the module's direct parameters and buffers.
    recurse = not record.children
    for name, tensor in list(frame.module.named_parameters(remove_duplicate=False, recurse=recurse)) + list(
        frame.module.named_buffers(remove_duplicate=False, recurse=recurse)
    ):
        local = escape_name(name.replace(".", "_"))
        if local in frame.attrs:
            continue
        node = frame.graph.get_attr(local)
        node.name = local if "." not in name else frame.names.fresh(local)
        frame.names.used.add(node.name)
        node.meta["example_value"] = tensor
        frame.attrs[local] = f"{frame.path}.{name}" if frame.path else name
        tensors[name] = node
    return tensors


def _opaque_attributes(frame: Frame, module_ref: torch.fx.Node) -> Dict[str, torch.fx.Node]:
    """Plain-data attributes (ints, floats, strings...; class attributes too), as graphpatch
    exposes them: read from the live module at call time, so the artifact stores only their
    names; a patched value is the module's for that call only (see run_opaque)."""
    attributes = {}
    for name in exposed_attributes(frame.module):
        node = frame.graph.call_function(module_attribute, (module_ref, name))
        node.name = frame.names.fresh(escape_name(name))
        node.meta["example_value"] = getattr(frame.module, name)
        attributes[name] = node
    return attributes


def build_leaf(frame: Frame, handler: Any) -> None:
    """A leaf module's graph: ``fn(module_ref, x, weight, bias)``, weight and bias bound
    by identity (see :mod:`graphpatch_cache.integrations`)."""
    frame.kind = "leaf"
    module_ref = frame.graph.get_attr("_graphpatch_module")
    module_ref.name = frame.names.exact("_graphpatch_module")
    tensors: List[Optional[torch.fx.Node]] = []
    for name in ("weight", "bias"):
        value = getattr(frame.module, name, None)
        if value is None:
            tensors.append(None)
            continue
        node = frame.graph.get_attr(name)
        node.name = name
        frame.names.used.add(name)
        node.meta["example_value"] = value
        frame.attrs[name] = f"{frame.path}.{name}" if frame.path else name
        tensors.append(node)
    placeholders = [n for n in frame.graph.nodes if n.op == "placeholder"]
    call = frame.graph.call_function(resolve_function(handler.call), (module_ref, placeholders[0], *tensors))
    call.name = frame.names.fresh("linear")
    out = frame.graph.output(call)
    out.meta["example_value"] = None


def build_custom(frame: Frame, fn: Callable[[torch.nn.Module], Any]) -> None:
    """A module graph supplied by ``custom_extraction_functions``: its placeholders are the
    forward's tensor inputs in order, its ``get_attr`` nodes the module's attributes."""
    frame.kind = "custom"
    graph = fn(frame.module)
    if isinstance(graph, torch.fx.GraphModule):
        graph = graph.graph
    if not isinstance(graph, torch.fx.Graph):
        raise ExtractionError(
            f"custom extraction function for {type(frame.module).__name__} returned "
            f"{type(graph).__name__}, not a torch.fx.Graph",
            module_path=frame.path,
        )
    mine = [n for n in frame.graph.nodes if n.op == "placeholder"]
    theirs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(mine) != len(theirs):
        raise ExtractionError(
            f"custom graph for {frame.path!r} has {len(theirs)} placeholders; the call passes "
            f"{len(mine)} tensors",
            module_path=frame.path,
        )
    if not any(n.op == "output" for n in graph.nodes):
        raise ExtractionError(f"custom graph for {frame.path!r} has no output", module_path=frame.path)
    env: Dict[torch.fx.Node, Any] = dict(zip(theirs, mine))
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            frame.graph.output(torch.fx.node.map_arg(node.args[0], env.__getitem__))
            continue
        if node.op == "get_attr":
            env[node] = _custom_attr(frame, node)
            continue
        if node.op == "call_module":
            raise ExtractionError(f"custom graph for {frame.path!r} calls a module; inline it", module_path=frame.path)
        new = frame.graph.create_node(
            node.op, node.target,
            torch.fx.node.map_arg(node.args, env.__getitem__), torch.fx.node.map_arg(node.kwargs, env.__getitem__),
        )
        new.name = frame.names.fresh(base_name(node))
        new.meta = dict(node.meta)
        env[node] = new


def _custom_attr(frame: Frame, node: torch.fx.Node) -> torch.fx.Node:
    """The frame's ``get_attr`` node for a custom graph's ``get_attr`` (one per attribute)."""
    target = str(node.target)
    owner, _, attr = target.rpartition(".")
    tensor_owner = frame.module.get_submodule(owner) if owner else frame.module
    value = getattr(tensor_owner, attr)
    local = escape_name(target.replace(".", "_"))
    if local not in frame.attr_nodes:
        new = frame.graph.get_attr(local)
        new.name = local if local not in frame.names.used or "." not in target else frame.names.fresh(local)
        frame.names.used.add(new.name)
        new.meta["example_value"] = value
        frame.attr_nodes[local] = new
        frame.attrs[local] = f"{frame.path}.{target}" if frame.path else target
    return frame.attr_nodes[local]


def read_leaf(frame: Frame, record: Optional[CallRecord], call: torch.fx.Node, index: int, fake: Any) -> torch.fx.Node:
    """Read the ``index``-th tensor leaf of a returned call's output (``call``, the
    call_module node in ``frame``'s graph) with getitem/getattr nodes; ``fake``: its value."""
    assert record is not None
    tensor_positions = [i for i, is_t in enumerate(record.output_is_tensor) if is_t]
    leaf_index = tensor_positions[index]
    dummy = _compat.tree_unflatten(list(range(len(record.output_leaves))), record.output_spec)
    paths: List[Any] = [p for p, _ in _compat.tree_flatten_with_path(dummy)[0]]
    value = call
    for key in paths[leaf_index]:
        if hasattr(key, "idx"):
            value = frame.graph.call_function(operator.getitem, (value, key.idx))
        elif hasattr(key, "key"):
            value = frame.graph.call_function(operator.getitem, (value, key.key))
        else:
            value = frame.graph.call_function(builtins.getattr, (value, key.name))
        value.name = frame.names.fresh("getitem")
    value.meta["example_value"] = fake
    return value


def size_node(frame: Frame, sym: Any) -> Optional[torch.fx.Node]:
    """A node recomputing the symbolic size ``sym`` from one of the frame's own tensor
    inputs (placed after the inputs, attributes and earlier sizes); None where none has it."""
    expr = getattr(getattr(sym, "node", None), "expr", None)
    if expr is None:
        return None
    for ph in [n for n in frame.graph.nodes if n.op == "placeholder"]:
        fake = ph.meta.get("example_value")
        if not isinstance(fake, torch.Tensor):
            continue
        for dim, size in enumerate(fake.shape):
            if isinstance(size, torch.SymInt) and size.node.expr == expr:
                heads = [n for n in frame.graph.nodes if n.op in ("placeholder", "get_attr")
                         or (n.op == "call_method" and n.target == "size" and n.meta.get("graphpatch_size"))]
                ctx = frame.graph.inserting_after(heads[-1]) if heads else contextlib.nullcontext()
                with ctx:
                    node = frame.graph.call_method("size", (ph, dim))
                node.name = frame.names.fresh("size")
                node.meta["example_value"] = sym
                node.meta["graphpatch_size"] = True
                return node
    return None


__all__ = ["Frame", "OpaqueCall", "build_custom", "build_leaf", "build_opaque", "read_leaf", "size_node"]
