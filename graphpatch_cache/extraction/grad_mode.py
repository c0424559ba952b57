"""Grad-mode switches in a traced forward, made relative to the caller's mode.

Dynamo records ``with torch.no_grad():`` as ``_set_grad_enabled(False)`` ...
``_set_grad_enabled(True)``, the second one restoring the mode seen while tracing (we trace
with grad enabled). Run as is under ``torch.no_grad()`` that would switch grad *on* for the
rest of the forward. :class:`GradModes` turns each switch into "set, remember the previous
mode" and each restore into "restore what was remembered".
"""

from __future__ import annotations

from typing import Any, Callable, List, Tuple

import torch.fx

from .. import _compat
from ..trust.functions import restore_grad_enabled, set_grad_enabled
from .frames import Frame

#: what dynamo records for a grad-mode switch (a private torch function, see _compat)
#: the grad-mode switch dynamo records (:data:`graphpatch_cache._compat.set_grad_enabled`)
GRAD_MODE_SWITCH = _compat.set_grad_enabled


class GradModes:
    """The grad-mode switches of one flat graph, in graph order."""

    def __init__(self) -> None:
        self.now = True  # capture runs under torch.enable_grad()
        self.stack: List[Tuple[bool, torch.fx.Node]] = []

    def rewrite(self, frame: Frame, node: torch.fx.Node, local: Callable[[Frame, Any], Any]) -> torch.fx.Node:
        """The node in ``frame``'s graph that replaces the switch ``node`` (``local``: how the
        splitter reads a flat value in a frame, for the switch a restore pairs with)."""
        mode = bool(node.args[0])
        if self.stack and mode == self.stack[-1][0]:
            _, switch = self.stack.pop()
            new = frame.graph.call_function(restore_grad_enabled, (local(frame, switch),))
            new.name = frame.names.fresh("restore_grad_enabled")
        else:
            new = frame.graph.call_function(set_grad_enabled, (mode,))
            new.name = frame.names.fresh("set_grad_enabled")
            self.stack.append((self.now, node))
        self.now = mode
        return new


__all__ = ["GRAD_MODE_SWITCH", "GradModes"]
