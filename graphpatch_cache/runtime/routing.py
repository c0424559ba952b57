"""How bound graphs stand in for the model's modules: an accelerate hook run around a
graph (:class:`HookedGraph`), and the router through which an opaque parent's calls of a child
module reach the graphs extracted for them (:class:`CallRouter`)."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import torch

from .. import _compat
from ..artifact import ModuleGraph
from ..artifact.signature import SignatureMatcher
from ..errors import SignatureMismatchError
from ..integrations import accelerate
from ..live.inputs import InputBinder, mismatch


def submodule(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """``model.get_submodule(path)`` through registered children only (``get_submodule``
    uses getattr, which would let a stored path reach any attribute).

    :raises AttributeError: no such submodule.
    """
    module = model
    for part in path.split(".") if path else ():
        child = module._modules.get(part)
        if child is None:
            raise AttributeError(f"{type(module).__name__} has no submodule {part!r}")
        module = child
    return module


class HookedGraph(torch.nn.Module):
    """Runs a module's accelerate hook around its graph, as the module itself would:
    ``pre_forward`` (moves inputs, loads offloaded weights), the graph, ``post_forward``
    (offloads them again)."""

    module: torch.nn.Module  # (set with object.__setattr__: not a submodule of the graph)

    def __init__(self, graph_module: torch.nn.Module, module: torch.nn.Module) -> None:
        super().__init__()
        self.graph_module = graph_module
        object.__setattr__(self, "module", module)

    def forward(self, *args: Any) -> Any:
        hook: Any = accelerate.hook_of(self.module)
        args, kwargs = hook.pre_forward(self.module, *args)
        output = self.graph_module(*args, **kwargs)
        return hook.post_forward(self.module, output)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.graph_module if isinstance(module, HookedGraph) else module


class CallRouter(torch.nn.Module):
    """Stands in for a child module while its opaque parent runs: the parent's k-th call of
    the child goes to the graph extracted for that call."""

    # (set with object.__setattr__: plain attributes, not submodules)
    original: torch.nn.Module
    graphs: List[Tuple[torch.nn.Module, SignatureMatcher]]
    _bind: InputBinder

    def __init__(self, original: torch.nn.Module, graphs: List[Tuple[torch.nn.Module, SignatureMatcher]]) -> None:
        super().__init__()
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "graphs", graphs)
        # (kept: binding the signature per call cost more than the rest of the routing)
        object.__setattr__(self, "_bind", InputBinder(original))
        self.__dict__["calls"] = 0  # plain attributes: Module.__setattr__ is slow per call

    def reset(self) -> None:
        self.__dict__["calls"] = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        calls = self.__dict__["calls"]
        gm, matcher = self.graphs[min(calls, len(self.graphs) - 1)]
        self.__dict__["calls"] = calls + 1
        if not unwrap(gm).__dict__.get("_graphpatch_patched", True):
            # nothing in this call (or below it) is patched or probed: the module's own call
            # is the graph's result exactly, without routing, binding or checking its inputs
            return self.original(*args, **kwargs)
        inputs = self._bind(args, kwargs)
        leaves, spec = _compat.tree_flatten(inputs)
        if not matcher.fits(leaves, spec):
            raise SignatureMismatchError(
                f"the opaque parent calls {gm._graphpatch_node_path!r} differently from the extraction call: "
                + mismatch(matcher, inputs),
                hint="extract with example inputs that match how you call the model",
            )
        return gm(*[x for x in leaves if isinstance(x, torch.Tensor)])


def routes(data: ModuleGraph, module: torch.nn.Module, children: Mapping[str, torch.nn.Module],
            model: torch.nn.Module) -> List[Tuple[torch.nn.Module, str, CallRouter]]:
    by_path: Dict[str, List[ModuleGraph]] = {}
    for child in data.children:
        by_path.setdefault(child.module_path, []).append(child)
    routes = []
    for path, graphs in by_path.items():
        target = submodule(model, path)
        graphs.sort(key=lambda g: g.call_index)
        router = CallRouter(target, [(children[g.name], SignatureMatcher(g.call_signature or {})) for g in graphs])
        for name, sub in module.named_modules(remove_duplicate=False):
            if sub is target and name:
                owner_name, _, attr = name.rpartition(".")
                routes.append((submodule(module, owner_name), attr, router))
    return routes


__all__ = ["CallRouter", "HookedGraph", "routes", "submodule", "unwrap"]
