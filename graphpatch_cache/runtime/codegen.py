"""Generated code shared between identical graphs of one binding.

fx generates Python for every ``GraphModule`` (``recompile``: code generation, ``compile``,
``exec``), about 1 ms a graph; a 32-layer model binds ~400 graphs whose decoder layers are
the same graph 32 times. :class:`SharedCode` generates the code once per distinct graph and
gives the same compiled ``forward`` *function object* to every identical graph (each
``GraphModule`` keeps its own class, as fx makes one per instance: patching assigns a new
``forward`` to one graph's class only).

"Identical" is what fx's code generation reads, compared exactly: each node's op, name,
type and arguments (node references by name; plain constants by type and ``repr``, which is
what the code spells), and every object the code reaches through its globals *by identity*:
call targets (two write guards made for different nodes are different closures behind the
same global name), and any other non-constant argument. A graph whose nodes carry metadata
fx would print (stack traces, annotations) is never shared.

Twins: a graph whose artifact data equals a template's (module class, kind, children,
attribute names, device and node list; the template needed nothing per node: no write guard,
live attribute or check of its module) would resolve to the same fx graph, so it is not built
at binding at all: it gets the template's forward and its own attributes, and builds its own
fx graph from its own data on first access to ``.graph`` (patching, inspection, deepcopy).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple, cast

import torch
import torch.fx

from .. import _compat

#: argument values fx spells by ``repr`` alone (globals it names for them are fixed: ``torch``,
#: ``device``, ``inf``...); anything else is compared by identity
_CONSTANTS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.memory_format,
              torch.layout, type(Ellipsis))

#: node metadata that fx's code generation never reads (ours)
_SILENT_META = frozenset({"graphpatch"})

#: set on a graph (and popped by its GraphModule's first ``recompile``): the code to install
PENDING_ATTR = "_graphpatch_shared_code"
#: set on a twin GraphModule until its fx graph is built (``ModuleGraphModule.graph``)
LAZY_ATTR = "_graphpatch_build_graph"


class SharedCode:
    """Compiled code by graph structure, for the graphs of one binding.

    Holds the objects its keys name by identity, so an id in a key is never reused while the
    memo lives; made per :func:`~graphpatch_cache.runtime.bind.bind` call and dropped with it
    (a process-wide memo would keep models alive through their write guards).
    """

    def __init__(self) -> None:
        self._known: Dict[Hashable, Tuple[Any, Any]] = {}
        self._keep: List[Any] = []
        self._templates: Dict[Hashable, Hashable] = {}
        #: (id(module), "_parameters"/"_buffers") -> the first device not meta below it (bind's look-up)
        self.devices: Dict[Tuple[int, str], Any] = {}
        #: code key -> whether the graph may write in place (a twin's is its template's)
        self.writes: Dict[Hashable, bool] = {}
        self.hits = 0

    def key(self, graph: torch.fx.Graph) -> Optional[Hashable]:
        """What the graph's generated code depends on, or ``None`` when it is not shared."""
        if not _compat.shares_graph_code(graph):
            return None
        keep = self._keep
        node_type = torch.fx.Node

        def arg(v: Any) -> Hashable:
            t = type(v)
            if t is node_type:
                return cast(str, v.name)  # (a bare str: constants are tuples, so never equal to one)
            if t in _CONSTANTS:
                return (t, repr(v))
            if isinstance(v, (tuple, list)):  # (also named tuples and fx's immutable lists)
                return ("t", t, tuple([arg(x) for x in v]))
            if isinstance(v, dict):
                return ("d", t, tuple([(arg(k), arg(x)) for k, x in v.items()]))
            if t is slice:
                return ("s", arg(v.start), arg(v.stop), arg(v.step))
            keep.append(v)
            return ("id", id(v))

        items: List[Hashable] = []
        for node in graph.nodes:
            if len(node.meta) > 1 or any(k not in _SILENT_META for k in node.meta):
                return None
            target = node.target
            if not isinstance(target, str):
                keep.append(target)
                target = ("id", id(target))
            items.append((node.op, node.name, target, arg(node.args), arg(node.kwargs), arg(node.type)))
        return tuple(items)

    def attach(self, graph: torch.fx.Graph, key: Optional[Hashable]) -> None:
        """Mark ``graph`` so its GraphModule's first compile installs the code known for ``key``."""
        if key is not None and key in self._known:
            graph.__dict__[PENDING_ATTR] = self._known[key]
            self.hits += 1

    def remember(self, key: Optional[Hashable], gm: torch.fx.GraphModule, data: Any = None, device: Any = None,
                 reusable: bool = False) -> None:
        """Record the code ``gm`` (just compiled for a graph with ``key``) has now; with
        ``reusable``, its module graph ``data`` (bound on ``device``) is a template: a graph
        whose data equals it gets the same code and builds its fx graph only when asked."""
        if key is None:
            return
        if key not in self._known:
            forward = type(gm).forward
            self._known[key] = (forward, torch.fx.graph.PythonCode(
                src=gm.code, globals=forward.__globals__, _lineno_map=getattr(gm, "_lineno_map", None),
                _prologue_start=getattr(gm, "_prologue_start", 0)))
        if reusable and data is not None:
            with contextlib.suppress(TypeError, ValueError):
                self._templates[_data_key(data, device)] = key

    def twin_of(self, data: Any, device: Any) -> Optional[Hashable]:
        """The code key of a template whose node data equals ``data``'s (same module class,
        kind, children, attribute names and device), or None."""
        try:
            return self._templates.get(_data_key(data, device))
        except (TypeError, ValueError):  # (node data that is not JSON: never a twin)
            return None

    def twin(self, key: Hashable, cls: Any, class_name: str, attrs: Dict[str, Any], data: Any,
             build: Callable[[], torch.fx.Graph]) -> Any:
        """A ``cls`` GraphModule with the template's code and the attributes fx would give it
        (the targets of ``get_attr``/``call_module`` nodes); its fx graph is ``build()``, made
        on first access (see :class:`~graphpatch_cache.runtime.graph_module.ModuleGraphModule`)."""
        placeholder = torch.fx.Graph()
        self.attach(placeholder, key)
        gm = cls({}, placeholder, class_name=class_name)
        targets = {nd.target for nd in data.nodes if nd.op in ("get_attr", "call_module")}
        for target in sorted(targets, key=lambda t: t.count(".")):
            _compat.assign_graph_attr(attrs[target], gm, target)
        gm.__dict__[LAZY_ATTR] = build
        return gm


def _data_key(data: Any, device: Any) -> Hashable:
    """Equal keys: equal node data, value types included (:meth:`ModuleGraph.nodes_key`)."""
    return (data.module_class, data.kind, tuple(c.name for c in data.children), tuple(sorted(data.attributes)),
            str(device), data.nodes_key())


def install_pending(gm: torch.fx.GraphModule) -> Optional[torch.fx.graph.PythonCode]:
    """Install the shared code :meth:`SharedCode.attach` put on ``gm``'s graph, once: a later
    ``recompile`` (patching changed the graph) generates code again. None: none was there."""
    pending = gm.graph.__dict__.pop(PENDING_ATTR, None)
    if pending is None:
        return None
    forward, python_code = pending
    _compat.install_graph_code(gm, forward, python_code)
    return python_code  # type: ignore[no-any-return]


__all__ = ["LAZY_ATTR", "PENDING_ATTR", "SharedCode", "install_pending"]
