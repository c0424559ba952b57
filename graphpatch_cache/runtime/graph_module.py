"""The GraphModule of one module call: its artifact data, the shared code it may start
with, its fx graph built when first asked (twins), and the code it runs now."""

from __future__ import annotations

from typing import Any, Dict, List, cast

import torch
import torch.fx

from ..artifact import ModuleGraph
from .codegen import LAZY_ATTR, install_pending

MODULE_REF_ATTR = "_graphpatch_module"
#: set on each bound graph by its patch installer: a weak reference to it (see ``code``)
SETTLE_ATTR = "_graphpatch_settle"


class ModuleGraphModule(torch.fx.GraphModule):
    """A GraphModule for one module call; keeps its artifact data for node-path look-ups."""

    _graphpatch_data: ModuleGraph
    _graphpatch_node_path: str
    _graphpatch_writes: bool

    def _recompile_submodules(self) -> List[Any]:
        """Compile this graph alone. ``GraphModule.recompile`` (torch 2.x) also recompiles every
        child GraphModule, recursively: with one graph per module call that made binding
        compile deep graphs once per ancestor, and a patch on the root regenerate the code of
        the whole tree. Each of our graphs compiles itself when it changes."""
        return []

    def recompile(self) -> Any:
        """fx's ``recompile``, except that a graph's first compile at binding takes the code of
        an identical graph compiled before (:mod:`.codegen`) when binding found one, and
        without fx's per-class ``__call__`` wrapper (it re-raises errors with the generated
        line quoted, at two extra Python calls per graph call: a tenth of a 32-layer model's
        time; tracebacks still show the generated code's lines)."""
        shared = install_pending(self)
        code = shared if shared is not None else super().recompile()
        if "__call__" in vars(type(self)):
            delattr(type(self), "__call__")  # (Module.__call__ again)
        return code

    @property
    def code(self) -> str:
        """The generated code this graph runs now (after leaving every patch block, its own:
        see ``PatchInstaller.settle``)."""
        settle = self.__dict__.get(SETTLE_ATTR)
        installer = settle() if settle is not None else None
        if installer is not None:
            installer.settle()
        return cast(str, torch.fx.GraphModule.code.fget(self))  # type: ignore[attr-defined]

    @property  # type: ignore[override]
    def graph(self) -> torch.fx.Graph:
        """The fx graph; a graph bound as the twin of an identical one builds it (from its own
        data, bound to its own module) on first access."""
        build = self.__dict__.pop(LAZY_ATTR, None)
        if build is not None:
            graph = build()
            self._graph = graph
            graph.owning_module = self
        return self._graph

    @graph.setter
    def graph(self, g: torch.fx.Graph) -> None:
        self.__dict__.pop(LAZY_ATTR, None)
        torch.fx.GraphModule.graph.fset(self, g)  # type: ignore[attr-defined]

    def __deepcopy__(self, memo: Dict[int, Any]) -> Any:
        self.graph  # (built first: fx copies the graph object)
        return super().__deepcopy__(memo)


__all__ = ["MODULE_REF_ATTR", "SETTLE_ATTR", "ModuleGraphModule"]
