"""Split one flat, marker-annotated dynamo graph into one fx graph per module call.

Walking the flat graph in order, an ``enter`` marker opens a frame for a module call and the
matching ``exit`` marker closes it. Every other node belongs to the innermost open frame.
Values crossing a frame boundary become the child graph's placeholders (named after the
forward's parameters) and its output; the parent graph gets a ``call_module`` node and reads
the leaves it uses out of the returned structure. Parameters and buffers become ``get_attr``
nodes in the graph of the module that owns them. Symbolic sizes are recomputed locally from
the frame's own inputs, so every graph stays shape-generic and self-contained.

A frame, and the graphs of calls dynamo did not trace (opaque, leaf and custom modules), are
in :mod:`.frames`; grad-mode switches are made relative to the caller's mode by
:mod:`.grad_mode`.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.fx

from .. import _compat, progress
from ..errors import ExtractionError
from ..integrations.bitsandbytes import leaf_handler
from ..trust.functions import grouped_mm, histc, tree_build
from . import naming
from .capture import Capture
from .frames import Frame, build_custom, build_leaf, build_opaque, read_leaf, size_node
from .grad_mode import GRAD_MODE_SWITCH, GradModes
from .local_names import base_name, escape_name
from .markers import ENTER, EXIT, OPAQUE
from .records import CallRecord, int_positions

#: calls with no effect on values that dynamo records anyway (usage logging); dropped.
_DROP_TARGETS = frozenset({_compat.API_USAGE_LOG})
#: torch functions graphs call through the library's stand-ins (same values; bounded
#: arguments, or the same values on every device)
_CHECKED_CALLS: Dict[Any, Any] = {torch.histc: histc}
if _compat.GROUPED_MM is not None:
    _CHECKED_CALLS[_compat.GROUPED_MM] = grouped_mm
#: a custom extraction function: module -> its fx graph
CustomFunctions = Mapping[type, Callable[[torch.nn.Module], Any]]


class Splitter:
    """Rebuilds the per-call graphs of one :class:`Capture` of ``model``."""

    def __init__(self, model: torch.nn.Module, cap: Capture, custom: Optional[CustomFunctions] = None) -> None:
        self.model = model
        self.custom = dict(custom or {})
        self.cap = cap
        self.calls = cap.recorder.calls
        self.tensor_names: Dict[int, List[str]] = cap.tensor_names
        # each call's local name and module path: see naming.py for the rule
        names = naming.name_calls(model, self.calls, cap.graph)
        self.local_names: Dict[int, str] = names.local
        self.call_paths: Dict[int, str] = names.path
        self.owner: Dict[torch.fx.Node, Frame] = {}
        self.param_ph: Dict[torch.fx.Node, List[str]] = {}
        self.sym_ph: Dict[torch.fx.Node, Any] = {}
        self._grad = GradModes()
        # the walk's state (see run)
        self._stack: List[Frame] = []
        self._root: Optional[Frame] = None
        self._call_iter: Iterator[CallRecord] = iter(())
        self._enter_outputs: Dict[torch.fx.Node, Frame] = {}
        self._exit_outputs: Dict[torch.fx.Node, Tuple[Frame, Optional[torch.fx.Node]]] = {}

    # -- main --------------------------------------------------------------------------------
    def run(self) -> Frame:
        """Walk the flat graph once, in order; returns the frame of the model's own call."""
        wrapper = self._wrapper_frame()
        self._stack = [wrapper]
        self._call_iter = progress.counted(self.calls, "splitting", len(self.calls))
        for node in self.cap.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                break
            self._visit(node, self._stack[-1], wrapper)
        if self._root is None:
            raise ExtractionError("internal: the model's own call was not captured")
        return self._root

    def _wrapper_frame(self) -> Frame:
        """The frame of capture's root wrapper, owning the flat graph's placeholders (which
        are parameters and buffers, symbolic sizes, or the model's inputs)."""
        placeholders = [n for n in self.cap.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.cap.example_inputs):
            raise ExtractionError("internal: placeholder count does not match the example inputs")
        wrapper = Frame(record=None, module=self.model, path="<wrapper>", local_name="", parent=None)
        for node, value in zip(placeholders, self.cap.example_inputs):
            if isinstance(value, torch.Tensor) and id(value) in self.tensor_names:
                self.param_ph[node] = self.tensor_names[id(value)]
            elif isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
                self.sym_ph[node] = _compat.fake_value(node)
            self.owner[node] = wrapper
        return wrapper

    def _visit(self, node: torch.fx.Node, top: Frame, wrapper: Frame) -> None:
        """One node of the flat graph: a marker opens or closes a frame, anything else is
        copied into the innermost open frame ``top``."""
        is_getitem = node.op == "call_function" and node.target is operator.getitem
        if node.target is ENTER or node.target is OPAQUE:
            self._enter(node, top)
        elif node.target is EXIT:
            self._exit(node)
        elif is_getitem and node.args[0] in self._enter_outputs:
            frame = self._enter_outputs[node.args[0]]  # type: ignore[index]
            frame.env[node] = frame.env[frame.inputs[node.args[1]]]  # type: ignore[index]
            self.owner[node] = frame
        elif top is wrapper:
            pass  # nothing of the wrapper's own survives
        elif is_getitem and node.args[0] in self._exit_outputs:
            child, call = self._exit_outputs[node.args[0]]  # type: ignore[index]
            assert call is not None
            top.env[node] = read_leaf(top, child.record, call, node.args[1], _compat.fake_value(node))  # type: ignore[arg-type]
            self.owner[node] = top
        elif node.op == "call_function" and node.target in _DROP_TARGETS and not node.users:
            pass
        elif node.op == "call_function" and node.target is GRAD_MODE_SWITCH:
            top.env[node] = self._grad.rewrite(top, node, self._local)
            self.owner[node] = top
        else:
            self._copy(top, node)

    def _enter(self, node: torch.fx.Node, top: Frame) -> None:
        """An enter marker opens a frame; an opaque marker opens, builds and closes one."""
        record = next(self._call_iter, None)
        if record is None or record.tag != node.args[0]:
            raise ExtractionError(
                "internal: traced module calls do not match the eager calls "
                f"({node.args[0]} vs {record.tag if record else None})"
            )
        frame = self._open(record, top, list(node.args[1]))  # type: ignore[arg-type]
        if self._root is None:
            self._root = frame
        if node.target is ENTER:
            self._enter_outputs[node] = frame
            self._stack.append(frame)
            return
        self._skip_calls(record)
        custom = self.custom.get(type(record.module))
        handler = leaf_handler(record.module)
        if custom is not None:
            build_custom(frame, custom)
        elif handler is not None:
            build_leaf(frame, handler)
        else:
            calls = [(self.calls[c], self.local_names[c], self.call_paths[c]) for c in record.children]
            build_opaque(frame, calls, _compat.fake_value(node), self._sizes(frame, node))
        self._exit_outputs[node] = (frame, self._close(frame, top))

    def _exit(self, node: torch.fx.Node) -> None:
        frame = self._stack.pop()
        if frame.record is None or frame.record.tag != node.args[0]:
            raise ExtractionError("internal: module exit does not match the open call")
        self._finish_output(frame, list(node.args[1]))  # type: ignore[arg-type]
        self._exit_outputs[node] = (frame, self._close(frame, self._stack[-1]))

    def _sizes(self, frame: Frame, node: torch.fx.Node) -> List[Any]:
        """The int leaves an opaque marker passes: a traced size as a value of the frame's graph
        (recomputed from its inputs, or passed in by the caller), a constant as it is."""
        ints = list(node.args[2]) if len(node.args) > 2 else []  # type: ignore[arg-type]
        assert frame.record is not None
        names = [frame.record.input_names[i] for i in int_positions(frame.record)]
        for v, name in zip(ints, names):  # a size the caller passes in: a placeholder named as the argument
            if isinstance(v, torch.fx.Node) and v not in frame.env:
                local = self._local(frame, v)
                if local.op == "placeholder":
                    local.name = local.target = frame.names.fresh(escape_name(name))
        return [self._local(frame, v) for v in ints]

    def _skip_calls(self, record: CallRecord) -> None:
        """An opaque call's descendants were recorded eagerly but not traced: skip them."""
        def count(r: CallRecord) -> int:
            return sum(1 + count(self.calls[c]) for c in r.children)

        for _ in range(count(record)):
            next(self._call_iter)

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
        out.meta["example_value"] = _compat.tree_unflatten(fake_leaves, record.output_spec)

    def _structure(self, frame: Frame, leaves: List[Any], spec: Any) -> Any:
        """The output value built from leaves: plain containers inline, anything else (a
        ModelOutput) through the registered ``unflatten`` helper."""
        if _plain_spec(spec):
            return _compat.tree_unflatten(leaves, spec)
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

    # -- values --------------------------------------------------------------------------------
    def _local(self, frame: Frame, value: Any) -> Any:
        if not isinstance(value, torch.fx.Node):
            return value
        if value in frame.env:
            return frame.env[value]
        if value in self.param_ph:
            return self._attr(frame, value)
        if value in self.sym_ph:
            local = size_node(frame, self.sym_ph[value])
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
            base = base_name(value)
        ph.name = ph.target = frame.names.fresh(escape_name(base))
        ph.meta["example_value"] = _compat.fake_value(value)
        frame.hidden.append(value)
        frame.env[value] = ph
        return ph

    def _copy(self, frame: Frame, node: torch.fx.Node) -> None:
        # twice: the first pass may export values out of returned calls, which re-points the
        # nodes that earlier arguments resolved to
        torch.fx.node.map_arg((node.args, node.kwargs), lambda v: self._local(frame, v))
        args = torch.fx.node.map_arg(node.args, lambda v: self._local(frame, v))
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda v: self._local(frame, v))
        target = _CHECKED_CALLS.get(node.target, node.target) if node.op == "call_function" else node.target
        new = frame.graph.create_node(node.op, target, args, kwargs)
        new.name = frame.names.fresh(base_name(node))
        new.meta = {k: node.meta[k] for k in ("example_value", "stack_trace") if k in node.meta}
        frame.env[node] = new
        self.owner[node] = frame


def _plain_spec(spec: Any) -> bool:
    if spec.is_leaf():
        return True
    if spec.type not in (tuple, list, dict):
        return False
    return all(_plain_spec(spec.child(i)) for i in range(spec.num_children))


def split(model: torch.nn.Module, cap: Capture, custom: Optional[CustomFunctions] = None) -> Frame:
    """Rebuild the per-call graphs; returns the frame of the model's own call.

    ``custom`` maps module classes to functions returning their fx graph."""
    return Splitter(model, cap, custom).run()


# Frame: re-exported for extraction/__init__.py, which imports it from here
__all__ = ["CustomFunctions", "Frame", "Splitter", "split"]
