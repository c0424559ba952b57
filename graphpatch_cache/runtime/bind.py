"""Binding: artifact + live model -> a tree of ``torch.fx.GraphModule``.

Every graph is rebuilt from node data; every call target goes through the allowlist in
:mod:`graphpatch_cache.trust.allowlist`; every ``get_attr`` binds the live model's own tensor object
(no copy). Nothing in the artifact is executed as text.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, FrozenSet, List, Optional, Set, Tuple

import torch
import torch.fx

from .. import _compat
from ..artifact import GraphArtifact, ModuleGraph, decode_value
from ..errors import ArtifactFormatError, DisallowedTargetError, ModelStructureError, SerializationError
from ..integrations import accelerate
from ..integrations.bitsandbytes import register_quantized_owner
from ..live.structure import first_difference, structure
from ..trust.allowlist import check_method, resolve_function
from ..trust.functions import ModuleRef, attribute_exposed, live_attr, module_attribute, run_opaque, spec_of, tree_build
from ..trust.validate import check_artifact
from . import guards
from .codegen import SharedCode
from .devices import device_mapper, module_device
from .graph_module import MODULE_REF_ATTR, SETTLE_ATTR, ModuleGraphModule
from .routing import HookedGraph, routes, submodule, unwrap
from ..artifact.names import qualname

def _lookup_tensor(model: torch.nn.Module, qualified: str, node_path: str) -> torch.Tensor:
    """The parameter or buffer ``qualified`` names."""
    module_path, _, name = qualified.rpartition(".")
    try:
        owner = submodule(model, module_path)
    except AttributeError as exc:
        raise ModelStructureError(
            f"graph {node_path!r} binds {qualified!r}, but the model has no module {module_path!r}",
            node_path=node_path,
            hint="this artifact was extracted from a differently structured model",
        ) from exc
    for table in (owner._parameters, owner._buffers):
        tensor = table.get(name)
        if isinstance(tensor, torch.Tensor):
            return tensor
    if hasattr(owner, name):
        raise DisallowedTargetError(
            f"graph {node_path!r} binds {qualified!r}, which is not a parameter or buffer of "
            f"{type(owner).__name__}: graphs bind only their module's own tensors",
            node_path=node_path, target=qualified,
            hint="do not load artifacts you do not trust")
    raise ModelStructureError(
        f"graph {node_path!r} binds {qualified!r}, but {type(owner).__name__} has no parameter or buffer {name!r}",
        node_path=node_path,
        hint="this artifact was extracted from a differently structured model",
    )


def bind_graph(
    data: ModuleGraph,
    model: torch.nn.Module,
    node_path: str = "",
    device: Optional[torch.device] = None,
    traced_on: FrozenSet[str] = frozenset(),
    hooked: Optional[bool] = None,
    shared: Optional[SharedCode] = None,
) -> ModuleGraphModule:
    """Rebuild one module graph (and its children) bound to ``model``'s tensors.

    :param shared: code generated for the graphs bound so far, reused for identical ones.

    :raises DisallowedTargetError: a node calls something outside the allowlist.
    :raises ModelStructureError: a module or tensor the graph binds is missing or differs.
    """
    module = _bound_module(data, model, node_path)
    if shared is None:
        shared = SharedCode()
    device = module_device(module, device, shared.devices)
    children = {
        child.name: bind_graph(child, model, f"{node_path}.{child.name}" if node_path else child.name, device, traced_on,
                               hooked, shared)
        for child in data.children
    }
    # Children go in as empty stand-ins and are swapped in afterwards: GraphModule's graph
    # setter recompiles every GraphModule child again, which made binding quadratic in depth.
    attrs: Dict[str, Any] = {name: torch.nn.Module() for name in children}
    attrs.update(_bound_tensors(data, model, node_path))
    if hooked is None:
        hooked = accelerate.is_hooked(model)
    map_device = device_mapper(device, traced_on)
    if data.kind == "leaf":
        register_quantized_owner(module)
    twin = None if hooked else shared.twin_of(data, device)
    if twin is not None:  # node data equal to a graph bound before: its code; our graph when asked for
        writes = shared.writes.get(twin, True)
        gm = shared.twin(twin, ModuleGraphModule, type(module).__name__, attrs, data, lambda: _build(
            _GraphBuilder(data, model, module, node_path, children, attrs, map_device, hooked)).graph)
    else:
        builder = _build(_GraphBuilder(data, model, module, node_path, children, attrs, map_device, hooked))
        writes = builder.writes
        key = shared.key(builder.graph)
        if key is not None:
            shared.writes[key] = writes
        shared.attach(builder.graph, key)
        try:
            gm = ModuleGraphModule(attrs, builder.graph, class_name=type(module).__name__)
        except (SyntaxError, NameError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            raise ArtifactFormatError(f"graph {node_path or '<root>'!r} does not compile to code: {exc!s:.200}",
                                      hint="the artifact is damaged; rebuild it") from exc
        shared.remember(key, gm, data, device, reusable=not (hooked or builder.per_node))
    for name, child in children.items():  # (also graphs an opaque module calls itself: no call_module)
        gm._modules[name] = child
    gm._graphpatch_data = data
    gm._graphpatch_node_path = node_path
    gm._graphpatch_writes = writes
    if accelerate.hook_of(module) is not None:
        return HookedGraph(gm, module)  # type: ignore[return-value]
    return gm


def _bound_module(data: ModuleGraph, model: torch.nn.Module, node_path: str) -> torch.nn.Module:
    """The module of ``model`` the graph was extracted from, of the recorded class."""
    try:
        module = submodule(model, data.module_path)
    except AttributeError as exc:
        raise ModelStructureError(
            f"graph {node_path or '<root>'!r} belongs to module {data.module_path!r}, which this model lacks",
            node_path=node_path,
            hint="this artifact was extracted from a differently structured model",
        ) from exc
    expected = data.module_class
    actual = qualname(type(module))
    if expected != actual:
        raise ModelStructureError(
            f"graph {node_path or '<root>'!r} was extracted from a {expected}, but module "
            f"{data.module_path or '<root>'!r} is a {actual}",
            node_path=node_path,
            hint="this artifact was extracted from a differently structured model",
        )
    return module


def _bound_tensors(data: ModuleGraph, model: torch.nn.Module, node_path: str) -> Dict[str, torch.Tensor]:
    """The graph's attributes: the live model's own tensors, of the recorded shape and dtype."""
    attrs: Dict[str, torch.Tensor] = {}
    metas = {nd.target: nd.meta for nd in data.nodes if nd.op == "get_attr"}
    for local, qualified in data.attributes.items():
        tensor = _lookup_tensor(model, qualified, node_path)
        meta = metas.get(local, {})
        if "shape" in meta:
            want = [int(s) if isinstance(s, int) else s for s in meta["shape"]]
            if list(tensor.shape) != want or str(tensor.dtype).removeprefix("torch.") != meta.get("dtype"):
                raise ModelStructureError(
                    f"graph {node_path or '<root>'!r} was extracted with {qualified} of shape {tuple(want)} and "
                    f"dtype {meta.get('dtype')}, but this model's is {tuple(tensor.shape)}, "
                    f"{str(tensor.dtype).removeprefix('torch.')}",
                    node_path=node_path,
                    hint="this artifact was extracted from a differently configured model (or another dtype)",
                )
        attrs[local] = tensor
    return attrs


def _build(builder: "_GraphBuilder") -> "_GraphBuilder":
    for nd in builder.data.nodes:
        builder.add(nd)
    return builder


class _GraphBuilder:
    """Adds one graph's nodes, from their data, to a new ``torch.fx.Graph``. ``per_node``: some
    node got a target of its own (a write guard, a live attribute) or a check of the module."""

    def __init__(self, data: ModuleGraph, model: torch.nn.Module, module: torch.nn.Module, node_path: str,
                 children: Dict[str, "ModuleGraphModule"], attrs: Dict[str, Any],
                 map_device: Callable[[torch.device], torch.device], hooked: bool) -> None:
        self.data, self.model, self.module, self.node_path = data, model, module, node_path
        self.children, self.attrs, self.map_device = children, attrs, map_device
        self.graph = torch.fx.Graph()
        self.env: Dict[str, torch.fx.Node] = {}
        # attributes of accelerate-hooked modules are read at call time (see live_attr)
        self.live = dict(data.attributes) if hooked else {}
        self.module_ref_node: Optional[torch.fx.Node] = None
        self.per_node = False
        #: nodes whose value is a tensor this graph made (a write into one needs no guard)
        self.fresh: Set[str] = set()
        #: whether a node may write into a tensor in place (one of its own, or an opaque call:
        #: the module's code may): recording may then not keep views of the graph's values
        self.writes = False

    def add(self, nd: Any) -> None:
        where = f"{self.node_path}.{nd.name}" if self.node_path else nd.name
        env = self.env

        def lookup(name: str) -> torch.fx.Node:
            if name not in env:
                raise SerializationError(f"node {where!r} refers to unknown node {name!r}", node_path=where)
            return env[name]

        def resolve(name: str) -> Any:
            return resolve_function(name, node_path=where)

        if nd.op == "call_function":  # refuse a disallowed target before decoding anything else
            target: Any = resolve_function(nd.target, node_path=where)
        args = decode_value(nd.args, lookup, resolve, self.map_device)
        kwargs = decode_value(nd.kwargs, lookup, resolve, self.map_device)
        if nd.op == "call_function":
            self.check_call(target, nd.target, args, where)
        else:
            target = self.target(nd, where)
        if nd.op == "get_attr" and nd.target in self.live:
            node = self.live_attribute(nd)
            self.per_node = True
        else:
            op, call = nd.op, target
            if nd.op in ("call_function", "call_method"):
                op, call, written = _guarded_writes(nd, target, args, kwargs, self.model, where, self.fresh)
                if guards.is_fresh(nd.op, nd.target, written, self.fresh):
                    self.fresh.add(nd.name)
                self.writes = self.writes or bool(written) or target is run_opaque
                self.per_node = self.per_node or op != nd.op or call is not target
            node = self.graph.create_node(op, call, tuple(args), dict(kwargs), name=nd.name)
        if node.name != nd.name:
            raise SerializationError(f"node name {nd.name!r} is not valid in graph {self.node_path!r}",
                                     node_path=where)
        node.meta["graphpatch"] = nd.meta
        env[nd.name] = node

    def check_call(self, target: Any, name: str, args: Any, where: str) -> None:
        """What binding checks of our own graph functions' arguments against the live module."""
        self.per_node = self.per_node or target in (run_opaque, module_attribute, tree_build)
        if target is run_opaque:
            _check_opaque_tensors(self.module, args, where, name)
            _check_opaque_attributes(self.module, list(args[6]) if len(args) == 7 else [], where, name)
        elif target is module_attribute:
            _check_opaque_attributes(self.module, [args[1]], where, name)
        if target is run_opaque or target is tree_build:
            _load_spec(args[1] if target is run_opaque else args[0], where, name)

    def target(self, nd: Any, where: str) -> Any:
        """The target of a node other than ``call_function``."""
        if nd.op == "call_method":
            return check_method(nd.target, node_path=where)
        if nd.op == "call_module":
            if nd.target not in self.children:
                raise SerializationError(f"node {where!r} calls unknown child graph {nd.target!r}", node_path=where)
        elif nd.op == "get_attr":
            if nd.target == MODULE_REF_ATTR:
                self.per_node = True
                self.attrs[MODULE_REF_ATTR] = ModuleRef(self.module, routes(self.data, self.module, self.children,
                                                                            self.model))
            elif nd.target not in self.data.attributes:
                raise SerializationError(f"node {where!r} reads undeclared attribute {nd.target!r}", node_path=where)
        elif nd.op not in ("placeholder", "output"):
            raise SerializationError(f"node {where!r} has unknown op {nd.op!r}", node_path=where)
        return nd.target

    def live_attribute(self, nd: Any) -> torch.fx.Node:
        """A ``get_attr`` of a hooked module, as a read of the module's attribute at call time."""
        if self.module_ref_node is None:
            with self.graph.inserting_before(next(iter(self.graph.nodes), None)):  # None: at the start
                self.module_ref_node = self.graph.get_attr(MODULE_REF_ATTR)
            self.attrs.setdefault(MODULE_REF_ATTR, ModuleRef(self.module))
        qualified = self.live[nd.target]
        prefix = self.data.module_path + "." if self.data.module_path else ""
        rel = qualified[len(prefix):] if qualified.startswith(prefix) else qualified
        ref_node = self.env.get(MODULE_REF_ATTR, self.module_ref_node)
        return self.graph.create_node("call_function", live_attr, (ref_node, rel), {}, name=nd.name)


def _load_spec(text: Any, where: str, target: str) -> None:
    """Load a structure spec now (strictly: only classes registered in this process), so a
    spec that cannot be built fails at load, not at the first call."""
    try:
        spec_of(text)
    except (_compat.UnsafeSpecError, TypeError) as exc:
        raise DisallowedTargetError(f"node {where!r} ({target}) builds a structure this process may not: {exc}",
                                    node_path=where, target=target,
                                    hint="import the model's module before loading; do not load artifacts you "
                                    "do not trust") from None


def _check_opaque_tensors(module: torch.nn.Module, args: Any, where: str, target: str) -> None:
    """An opaque call substitutes only the module's own parameters and buffers, by name."""
    own = {n for n, _ in module.named_parameters(remove_duplicate=False)} | {
        n for n, _ in module.named_buffers(remove_duplicate=False)}
    stray = sorted(set(args[5]) - own) if len(args) in (6, 7) and isinstance(args[5], dict) else ["<malformed>"]
    if stray:
        raise DisallowedTargetError(
            f"node {where!r} passes {stray[0]!r} as a tensor of {type(module).__name__}, which has no such "
            "parameter or buffer", node_path=where, target=target, hint="do not load artifacts you do not trust")


def _check_opaque_attributes(module: torch.nn.Module, names: List[Any], where: str, target: str) -> None:
    """An opaque graph reads (and, patched, sets for one call) only its module's plain-data
    attributes: never a method, property, parameter, buffer, child or Module machinery."""
    for name in names:
        if not attribute_exposed(module, name):
            raise DisallowedTargetError(
                f"node {where!r} exposes attribute {str(name)[:60]!r} of {type(module).__name__}, which is not a "
                "plain-data attribute of that module (numbers, strings, bools, None...)", node_path=where,
                target=target, hint="do not load artifacts you do not trust")


def _guarded_writes(nd: Any, target: Any, args: Any, kwargs: Any, model: torch.nn.Module,
                    where: str, fresh: Set[str]) -> Tuple[str, Any, List[Any]]:
    """Guard a node that writes one of its inputs (a write into what may statically alias a
    parameter was already refused by :func:`check_artifact`, from the recorded structure,
    which binding has matched against the live model); a write into a tensor the graph made
    (a node named in ``fresh``) is left unguarded.

    :returns: the (op, target) to create the fx node with, and the values it writes.
    """
    written = guards.written_inputs(nd.op, nd.target, target, args, kwargs)
    nodes = [v for v in written if isinstance(v, torch.fx.Node) and v.name not in fresh]
    if not nodes:
        return nd.op, target, written
    positions = [i for i, a in enumerate(args) if any(a is n for n in nodes)]
    keywords = [k for k, v in kwargs.items() if any(v is n for n in nodes)]
    call = guards.method_call(target) if nd.op == "call_method" else target
    return "call_function", guards.guarded(call, positions, keywords, model, where, str(nd.target)), written


def bind(artifact: GraphArtifact, model: torch.nn.Module) -> ModuleGraphModule:
    """Rebuild the artifact's root graph bound to ``model``.

    An artifact that did not come through :mod:`graphpatch_cache.trust.validate`'s doors (built
    in memory, ``GraphArtifact.from_dict``) is checked here first; checked ones are not again.
    """
    check_artifact(artifact)
    recorded = artifact.extraction.get("structure")
    if recorded is not None:
        difference = first_difference(recorded, structure(model))
        if difference is not None:
            raise ModelStructureError(
                f"these graphs were extracted from a differently structured {artifact.model_class.rpartition('.')[2]}: "
                + difference,
                hint="load them onto the model they were extracted from (same config and dtype), or extract anew",
            )
    traced_on = frozenset(torch.device(d).type for d in artifact.extraction.get("devices", []))
    return bind_graph(artifact.root, model, traced_on=traced_on, hooked=accelerate.is_hooked(model))


__all__ = ["HookedGraph", "MODULE_REF_ATTR", "SETTLE_ATTR", "ModelStructureError", "ModuleGraphModule", "bind", "bind_graph",
           "submodule", "unwrap"]
