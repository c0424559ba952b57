"""Split one flat, marker-annotated dynamo graph into one fx graph per module call.

Walking the flat graph in order, an ``enter`` marker opens a frame for a module call and the
matching ``exit`` marker closes it. Every other node belongs to the innermost open frame.
Values crossing a frame boundary become the child graph's placeholders (named after the
forward's parameters) and its output; the parent graph gets a ``call_module`` node and reads
the leaves it uses out of the returned structure. Parameters and buffers become ``get_attr``
nodes in the graph of the module that owns them. Symbolic sizes are recomputed locally from
the frame's own inputs, so every graph stays shape-generic and self-contained.
"""

from __future__ import annotations

import builtins
import contextlib
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.utils._pytree as pytree

from .. import _compat
from ..integrations import kv_cache
from ..errors import ExtractionError, UnsupportedCacheError
from ..integrations.bitsandbytes import leaf_handler
from ..trust.allowlist import resolve_function
from .capture import Capture
from . import naming
from .naming import ILLEGAL, RESERVED, escape_name
from .markers import ENTER, EXIT, OPAQUE, CallRecord

_SUFFIX = re.compile(r"^(.*)_(\d+)$")
#: calls with no effect on values that dynamo records anyway (usage logging); dropped.
_DROP_TARGETS = frozenset({torch._C._log_api_usage_once})


class _Names:
    """Per-graph name allocation, following torch.fx's numbering (``mul``, ``mul_1``...)."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        self.counts: Dict[str, int] = {}

    def exact(self, name: str) -> str:
        if name in self.used:
            raise ExtractionError(f"internal: duplicate local name {name!r}")
        self.used.add(name)
        return name

    def fresh(self, candidate: str) -> str:
        candidate = re.sub(r"\W", "_", candidate) or "_unnamed"
        if candidate[0].isdigit():
            candidate = f"_{candidate}"
        match = _SUFFIX.match(candidate)
        base = match.group(1) if match else candidate
        while base in RESERVED:  # a local variable called `output` or `_code`
            base = base + "_"
        num = self.counts.get(base, 0)
        name = base
        while name in self.used or name in ILLEGAL:
            num += 1
            name = f"{base}_{num}"
        self.used.add(name)
        self.counts[base] = num
        return name


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
    names: _Names = field(default_factory=_Names)
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
    #: for opaque frames: (call record, local name, module path) of each call the module makes itself
    opaque_calls: List[Tuple[CallRecord, str, str]] = field(default_factory=list)


class Splitter:
    """Rebuilds the per-call graphs of one :class:`Capture` of ``model``."""

    def __init__(self, model: torch.nn.Module, cap: Capture, custom: Optional[Dict[type, Callable]] = None) -> None:
        self.model = model
        self.custom = dict(custom or {})
        self.cap = cap
        self.calls = cap.recorder.calls
        self.module_names = naming.module_names(model)
        self.tensor_names: Dict[int, List[str]] = cap.tensor_names
        # each call's local name and module path: see naming.py for the rule
        names = naming.name_calls(model, self.calls, cap.graph, self.module_names)
        self.local_names: Dict[int, str] = names.local
        self.call_paths: Dict[int, str] = names.path
        self.owner: Dict[torch.fx.Node, Frame] = {}
        self.param_ph: Dict[torch.fx.Node, List[str]] = {}
        self.sym_ph: Dict[torch.fx.Node, Any] = {}
        self._grad_mode_now = True  # capture runs under torch.enable_grad()
        self._grad_stack: List[Tuple[bool, torch.fx.Node]] = []

    # -- main --------------------------------------------------------------------------------
    def run(self) -> Frame:
        graph = self.cap.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.cap.example_inputs):
            raise ExtractionError("internal: placeholder count does not match the example inputs")
        wrapper = Frame(record=None, module=self.model, path="<wrapper>", local_name="", parent=None)
        for node, value in zip(placeholders, self.cap.example_inputs):
            if isinstance(value, torch.Tensor) and id(value) in self.tensor_names:
                self.param_ph[node] = self.tensor_names[id(value)]
            elif isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
                self.sym_ph[node] = _compat.fake_value(node)
            self.owner[node] = wrapper
        stack: List[Frame] = [wrapper]
        root: Optional[Frame] = None
        call_iter = iter(self.calls)
        enter_outputs: Dict[torch.fx.Node, Frame] = {}
        exit_outputs: Dict[torch.fx.Node, Tuple[Frame, torch.fx.Node]] = {}
        for node in graph.nodes:
            if node.op == "placeholder":
                continue
            top = stack[-1]
            if node.op == "output":
                break
            if node.target is ENTER or node.target is OPAQUE:
                record = next(call_iter, None)
                if record is None or record.tag != node.args[0]:
                    raise ExtractionError(
                        "internal: traced module calls do not match the eager calls "
                        f"({node.args[0]} vs {record.tag if record else None})"
                    )
                frame = self._open(record, top, list(node.args[1]))
                if node.target is OPAQUE:
                    if root is None:
                        root = frame
                    self._skip_calls(record, call_iter)
                    custom = self.custom.get(type(record.module))
                    handler = leaf_handler(record.module)
                    if custom is not None:
                        self._build_custom(frame, custom)
                    elif handler is not None:
                        self._build_leaf(frame, handler)
                    else:
                        self._build_opaque(frame, _compat.fake_value(node))
                    call = self._close(frame, top)
                    exit_outputs[node] = (frame, call)
                else:
                    enter_outputs[node] = frame
                    stack.append(frame)
                    if root is None:
                        root = frame
                continue
            if node.target is EXIT:
                frame = stack.pop()
                if frame.record is None or frame.record.tag != node.args[0]:
                    raise ExtractionError("internal: module exit does not match the open call")
                self._finish_output(frame, list(node.args[1]))
                call = self._close(frame, stack[-1])
                exit_outputs[node] = (frame, call)
                continue
            if node.op == "call_function" and node.target is operator.getitem and node.args[0] in enter_outputs:
                frame = enter_outputs[node.args[0]]
                frame.env[node] = frame.env[frame.inputs[node.args[1]]]
                self.owner[node] = frame
                continue
            if top is wrapper:
                continue  # nothing of the wrapper's own survives
            if node.op == "call_function" and node.target is operator.getitem and node.args[0] in exit_outputs:
                child, call = exit_outputs[node.args[0]]
                top.env[node] = self._leaf_access(top, child, call, node.args[1], node)
                self.owner[node] = top
                continue
            if node.op == "call_function" and node.target in _DROP_TARGETS and not node.users:
                continue
            if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
                self._grad_mode(top, node)
                continue
            self._copy(top, node)
        if root is None:
            raise ExtractionError("internal: the model's own call was not captured")
        return root

    def _skip_calls(self, record: CallRecord, call_iter) -> None:
        """An opaque call's descendants were recorded eagerly but not traced: skip them."""
        def count(r: CallRecord) -> int:
            return sum(1 + count(self.calls[c]) for c in r.children)

        for _ in range(count(record)):
            next(call_iter)

    # -- frames --------------------------------------------------------------------------------
    def _open(self, record: CallRecord, parent: Frame, flat_inputs: List[torch.fx.Node]) -> Frame:
        path = self.call_paths[record.index]
        frame = Frame(
            record=record,
            module=record.module,
            path=path,
            local_name=self.local_names[record.index] if parent.record is not None else "",
            parent=parent,
        )
        frame.inputs = flat_inputs
        frame.input_spec = _compat.treespec_dumps(record.input_spec)
        for child in record.children:
            frame.names.used.add(self.local_names[child])
        for name, _ in list(record.module.named_parameters(recurse=False)) + list(record.module.named_buffers(recurse=False)):
            frame.names.used.add(escape_name(name))
        tensor_names = [n for n, is_t in zip(record.input_names, record.input_is_tensor) if is_t]
        locations = [loc for loc, is_t in zip(record.input_locations, record.input_is_tensor) if is_t]
        for i, (flat, name) in enumerate(zip(flat_inputs, tensor_names)):
            ph = frame.graph.placeholder("_tmp")
            ph.name = ph.target = frame.names.fresh(escape_name(name))
            ph.meta["example_value"] = _compat.fake_value(flat)
            if i < len(locations):  # where the input sits in the forward's signature (node path aliases)
                ph.meta["graphpatch_input"] = locations[i]
            frame.env[flat] = ph
        return frame

    def _finish_output(self, frame: Frame, flat_outputs: List[torch.fx.Node]) -> None:
        record = frame.record
        assert record is not None
        for v in flat_outputs:  # first pass: any exports happen before we hold local nodes
            self._local(frame, v)
        values = iter([self._local(frame, v) for v in flat_outputs])
        leaves = [next(values) if is_t else leaf for leaf, is_t in zip(record.output_leaves, record.output_is_tensor)]
        fakes = iter([_compat.fake_value(v) for v in flat_outputs])
        fake_leaves = [next(fakes) if is_t else leaf for leaf, is_t in zip(record.output_leaves, record.output_is_tensor)]
        out = frame.graph.output(self._structure(frame, leaves, record.output_spec))
        out.meta["example_value"] = pytree.tree_unflatten(fake_leaves, record.output_spec)

    def _structure(self, frame: Frame, leaves: List[Any], spec: Any) -> Any:
        """The output value built from leaves: plain containers inline, anything else (a
        ModelOutput) through the registered ``unflatten`` helper."""
        if _plain_spec(spec):
            return pytree.tree_unflatten(leaves, spec)
        from ..trust.functions import tree_build

        node = frame.graph.call_function(tree_build, (_compat.treespec_dumps(spec), list(leaves)))
        node.name = frame.names.fresh("output_value")
        return node

    def _close(self, frame: Frame, parent: Frame) -> Optional[torch.fx.Node]:
        if parent.record is None:
            return None  # the model's own call: nothing to call it from
        parent.children.append(frame)
        for v in list(frame.inputs) + list(frame.hidden):
            self._local(parent, v)
        args = [self._local(parent, v) for v in frame.inputs] + [self._local(parent, h) for h in frame.hidden]
        call = parent.graph.call_module(frame.local_name, tuple(args))
        call.name = frame.local_name  # reserved when the parent frame was opened
        frame.call_node = call
        return call

    def _leaf_access(self, frame: Frame, child: Frame, call: torch.fx.Node, index: int, flat: torch.fx.Node) -> torch.fx.Node:
        record = child.record
        assert record is not None
        tensor_positions = [i for i, is_t in enumerate(record.output_is_tensor) if is_t]
        leaf_index = tensor_positions[index]
        dummy = pytree.tree_unflatten(list(range(len(record.output_leaves))), record.output_spec)
        paths = [p for p, _ in pytree.tree_flatten_with_path(dummy)[0]]
        value = call
        for key in paths[leaf_index]:
            if hasattr(key, "idx"):
                value = frame.graph.call_function(operator.getitem, (value, key.idx))
            elif hasattr(key, "key"):
                value = frame.graph.call_function(operator.getitem, (value, key.key))
            else:
                value = frame.graph.call_function(builtins.getattr, (value, key.name))
            value.name = frame.names.fresh("getitem")
        value.meta["example_value"] = _compat.fake_value(flat)
        return value

    def _build_opaque(self, frame: Frame, fake_outputs: Any = None) -> None:
        """An opaque call's graph: inputs, the module's parameters and buffers as nodes, its
        plain-data attributes as nodes read at call time, one call of the original module with
        them, and the structured output (its metadata from ``fake_outputs``, the opaque
        marker's fake tensor outputs)."""
        from ..trust.functions import exposed_attributes, module_attribute, run_opaque

        frame.kind = "opaque"
        record = frame.record
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
        frame.opaque_calls = [
            (self.calls[c], self.local_names[c], self.call_paths[c])
            for c in frame.record.children
        ]
        record = frame.record
        assert record is not None
        module_ref = frame.graph.get_attr("_graphpatch_module")
        module_ref.name = frame.names.exact("_graphpatch_module")
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
        # Plain-data attributes (ints, floats, strings...; class attributes too), as graphpatch
        # exposes them: read from the live module at call time, so the artifact stores only
        # their names; a patched value is the module's for that call only (see run_opaque).
        attributes = {}
        for name in exposed_attributes(frame.module):
            node = frame.graph.call_function(module_attribute, (module_ref, name))
            node.name = frame.names.fresh(escape_name(name))
            node.meta["example_value"] = getattr(frame.module, name)
            attributes[name] = node
        placeholders = [n for n in frame.graph.nodes if n.op == "placeholder"]
        args = (module_ref, frame.input_spec, record.input_leaves, record.input_is_tensor, placeholders, tensors)
        result = frame.graph.call_function(run_opaque, args + ((attributes,) if attributes else ()))
        result.name = frame.names.fresh("forward_output")
        out = frame.graph.output(result)
        if isinstance(fake_outputs, (list, tuple)):
            # the output's structure with the fake tensors (symbolic sizes) in it: `_shape`
            # of the output and of its parts, as for compiled graphs
            fakes = iter(fake_outputs)
            leaves = [next(fakes, None) if is_t else leaf for leaf, is_t in zip(record.output_leaves, record.output_is_tensor)]
            value = pytree.tree_unflatten(leaves, record.output_spec)
            result.meta["example_value"] = out.meta["example_value"] = value

    def _build_leaf(self, frame: Frame, handler: Any) -> None:
        """A leaf module's graph: ``fn(module_ref, x, weight, bias)``, weight and bias bound
        by identity (see :mod:`graphpatch_cache.integrations`)."""
        frame.kind = "leaf"
        module_ref = frame.graph.get_attr("_graphpatch_module")
        module_ref.name = frame.names.exact("_graphpatch_module")
        tensors = []
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

    def _build_custom(self, frame: Frame, fn: Callable) -> None:
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
        env: Dict[torch.fx.Node, Any] = dict(zip(theirs, mine))
        for node in graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                out = frame.graph.output(torch.fx.node.map_arg(node.args[0], env.__getitem__))
                continue
            if node.op == "get_attr":
                owner, _, attr = node.target.rpartition(".")
                tensor_owner = frame.module.get_submodule(owner) if owner else frame.module
                value = getattr(tensor_owner, attr)
                local = escape_name(node.target.replace(".", "_"))
                if local not in frame.attr_nodes:
                    new = frame.graph.get_attr(local)
                    new.name = local if local not in frame.names.used or "." not in node.target else frame.names.fresh(local)
                    frame.names.used.add(new.name)
                    new.meta["example_value"] = value
                    frame.attr_nodes[local] = new
                    frame.attrs[local] = f"{frame.path}.{node.target}" if frame.path else node.target
                env[node] = frame.attr_nodes[local]
                continue
            if node.op == "call_module":
                raise ExtractionError(f"custom graph for {frame.path!r} calls a module; inline it", module_path=frame.path)
            new = frame.graph.create_node(
                node.op, node.target,
                torch.fx.node.map_arg(node.args, env.__getitem__), torch.fx.node.map_arg(node.kwargs, env.__getitem__),
            )
            new.name = frame.names.fresh(_base_name(node))
            new.meta = dict(node.meta)
            env[node] = new
        del out

    # -- values --------------------------------------------------------------------------------
    def _local(self, frame: Frame, value: Any) -> Any:
        if not isinstance(value, torch.fx.Node):
            return value
        if value in frame.env:
            return frame.env[value]
        if value in self.param_ph:
            return self._attr(frame, value)
        if value in self.sym_ph:
            local = self._size_of(frame, value)
            if local is not None:
                frame.env[value] = local
                return local
        owner = self.owner.get(value)
        ancestors = []
        f = frame.parent
        while f is not None:
            ancestors.append(f)
            f = f.parent
        if owner is not None and owner not in ancestors and owner is not frame and value not in self.sym_ph:
            self._export(owner, value, frame, ancestors)
            if value in frame.env:
                return frame.env[value]
        return self._hidden(frame, value)

    def _export(self, owner: Frame, value: torch.fx.Node, frame: Frame, ancestors: List[Frame]) -> None:
        """``value`` was computed inside a module call that has returned, and is used outside
        it without having been returned (transformers' output recorders collect hidden states
        and attention weights this way). Make it an extra output of each closed call on the
        way up to the nearest frame that ``frame`` can reach."""
        chain = []
        f: Optional[Frame] = owner
        while f is not None and f not in ancestors and f is not frame:
            chain.append(f)
            f = f.parent
        if f is None or any(c.call_node is None for c in chain):
            raise ExtractionError(
                f"value {value.name!r} used in module {frame.path!r} escapes the module call that "
                "computed it in a way we cannot follow",
                module_path=frame.path,
            )
        for closed in chain:
            self._add_extra_output(closed, value)

    def _add_extra_output(self, child: Frame, value: torch.fx.Node) -> None:
        parent = child.parent
        assert parent is not None and child.call_node is not None
        local = self._local(child, value)
        out = next(n for n in child.graph.nodes if n.op == "output")
        if not child.extras:
            call = child.call_node
            with parent.graph.inserting_after(call):
                main = parent.graph.call_function(operator.getitem, (call, 0))
            main.name = parent.names.fresh("getitem")
            main.meta = dict(call.meta)
            call.replace_all_uses_with(main, delete_user_cb=lambda user: user is not main)
            for key, mapped in list(parent.env.items()):  # a bare-tensor output is the call itself
                if mapped is call:
                    parent.env[key] = main
            out.args = ((out.args[0], ()),)
            child.extras_node = main  # type: ignore[attr-defined]
        child.extras.append(value)
        structure, extras = out.args[0]
        out.args = ((structure, tuple(extras) + (local,)),)
        out.meta["graphpatch_extras"] = len(child.extras)
        anchor = child.call_node
        last = max((u for u in anchor.users), key=lambda n: list(parent.graph.nodes).index(n), default=anchor)
        with parent.graph.inserting_after(last):
            pack = parent.graph.call_function(operator.getitem, (anchor, 1))
        pack.name = parent.names.fresh("getitem")
        with parent.graph.inserting_after(pack):
            item = parent.graph.call_function(operator.getitem, (pack, len(child.extras) - 1))
        item.name = parent.names.fresh("getitem")
        item.meta["example_value"] = _compat.fake_value(value)
        parent.env[value] = item
        self.owner[value] = parent

    def _attr(self, frame: Frame, value: torch.fx.Node) -> torch.fx.Node:
        names = self.param_ph[value]
        prefix = frame.path + "." if frame.path else ""
        inside = [n for n in names if n.startswith(prefix)] if prefix else list(names)
        if not inside:
            if frame.parent is None or frame.parent.record is None:
                raise ExtractionError(f"internal: tensor {names[0]} has no owner")
            return self._hidden(frame, value)
        rel = inside[0][len(prefix):]
        local = escape_name(rel.replace(".", "_"))
        if local not in frame.attr_nodes:
            first = next((n for n in frame.graph.nodes if n.op not in ("placeholder", "get_attr")), None)
            ctx = frame.graph.inserting_before(first) if first is not None else contextlib.nullcontext()
            with ctx:
                node = frame.graph.get_attr(local)
            node.name = local if "." not in rel else frame.names.fresh(local)
            frame.names.used.add(node.name)
            node.target = local
            node.meta["example_value"] = _compat.fake_value(value)
            frame.attr_nodes[local] = node
            frame.attrs[local] = inside[0]
        frame.env[value] = frame.attr_nodes[local]
        return frame.attr_nodes[local]

    def _hidden(self, frame: Frame, value: torch.fx.Node) -> torch.fx.Node:
        first = next((n for n in frame.graph.nodes if n.op != "placeholder"), None)
        ctx = frame.graph.inserting_before(first) if first is not None else contextlib.nullcontext()
        with ctx:
            ph = frame.graph.placeholder("_tmp")
        # named as where it comes from: a model input read through a key/value cache object
        # is `cache_layer0_keys` in the root graph, so also in the graphs that read it
        owner = self.owner.get(value)
        source = owner.env.get(value) if owner is not None else None
        if isinstance(source, torch.fx.Node) and source.op == "placeholder":
            base = source.name
        else:
            base = _base_name(value)
        ph.name = ph.target = frame.names.fresh(escape_name(base))
        ph.meta["example_value"] = _compat.fake_value(value)
        frame.hidden.append(value)
        frame.env[value] = ph
        return ph

    def _size_of(self, frame: Frame, value: torch.fx.Node) -> Optional[torch.fx.Node]:
        """Recompute a symbolic size from one of the frame's own tensor inputs."""
        sym = self.sym_ph[value]
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

    def _grad_mode(self, frame: Frame, node: torch.fx.Node) -> None:
        """Make grad-mode switches relative to the caller's mode.

        Dynamo records ``with torch.no_grad():`` as ``_set_grad_enabled(False)`` ...
        ``_set_grad_enabled(True)``, the second one restoring the mode seen while tracing
        (we trace with grad enabled). Run as is under ``torch.no_grad()`` that would switch
        grad *on* for the rest of the forward. We turn each switch into "set, remember the
        previous mode" and each restore into "restore what was remembered".
        """
        from ..trust.functions import restore_grad_enabled, set_grad_enabled

        mode = bool(node.args[0])
        if self._grad_stack and mode == self._grad_stack[-1][0]:
            _, switch = self._grad_stack.pop()
            new = frame.graph.call_function(restore_grad_enabled, (self._local(frame, switch),))
            new.name = frame.names.fresh("restore_grad_enabled")
        else:
            new = frame.graph.call_function(set_grad_enabled, (mode,))
            new.name = frame.names.fresh("set_grad_enabled")
            self._grad_stack.append((self._grad_mode_now, node))
        self._grad_mode_now = mode
        frame.env[node] = new
        self.owner[node] = frame

    def _copy(self, frame: Frame, node: torch.fx.Node) -> None:
        # twice: the first pass may export values out of returned calls, which re-points the
        # nodes that earlier arguments resolved to
        torch.fx.node.map_arg((node.args, node.kwargs), lambda v: self._local(frame, v))
        args = torch.fx.node.map_arg(node.args, lambda v: self._local(frame, v))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda v: self._local(frame, v))
        new = frame.graph.create_node(node.op, node.target, args, kwargs)
        new.name = frame.names.fresh(_base_name(node))
        new.meta = {k: node.meta[k] for k in ("example_value", "stack_trace") if k in node.meta}
        frame.env[node] = new
        self.owner[node] = frame


def _base_name(node: torch.fx.Node) -> str:
    name = node.name
    match = _SUFFIX.match(name)
    base = match.group(1) if match else name
    if base.startswith("l_") and base.endswith("_"):
        base = base[2:-1]
    return base or "value"


def _plain_spec(spec: Any) -> bool:
    if spec.is_leaf():
        return True
    if spec.type not in (tuple, list, dict):
        return False
    return all(_plain_spec(spec.child(i)) for i in range(spec.num_children))


def split(model: torch.nn.Module, cap: Capture, custom: Optional[Dict[type, Callable]] = None) -> Frame:
    """Rebuild the per-call graphs; returns the frame of the model's own call.

    ``custom`` maps module classes to functions returning their fx graph."""
    return Splitter(model, cap, custom).run()
