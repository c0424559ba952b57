"""Local names inside one module call's graph: which names are safe, and who gets which.

A local name is a GraphModule attribute and a NodePath component at once, so it must be a
Python identifier that is neither a keyword or builtin nor a name the generated code or
NodePath uses itself (:func:`escape_name`). Nodes are numbered the way torch.fx does
(``mul``, ``mul_1``...; :class:`LocalNames`).
"""

from __future__ import annotations

import builtins
import keyword
import re
from typing import Dict

import torch.fx

from ..errors import ExtractionError

#: names that cannot be local names (Python keywords and builtins, names generated code uses)
ILLEGAL = set(keyword.kwlist) | set(dir(builtins)) | {
    "inf", "nan", "NoneType", "torch", "device", "fx_pytree", "pytree", "self",
}
#: names NodePath and GraphModule use themselves; user names that collide get a trailing "_".
RESERVED = frozenset(
    {"_code", "_shape", "graph", "code", "forward", "training", "recompile", "output", "to_folder",
     "print_readable", "meta", "modules", "parameters", "buffers", "children", "state_dict", "type",
     "cuda", "cpu", "to", "float", "half", "double", "eval", "train", "apply", "zero_grad", "share_memory",
     "extra_repr", "register_buffer", "register_module", "get_submodule", "get_parameter", "named_modules",
     "add_module", "requires_grad_", "load_state_dict", "bfloat16", "ipu", "xpu", "mtia", "compile"}
)


def escape_name(name: str) -> str:
    """A local name safe as a GraphModule attribute and a NodePath component."""
    name = re.sub(r"\W", "_", name)
    if not name or name[0].isdigit():
        name = f"sub_{name}"
    while name in RESERVED or name in ILLEGAL:
        name = name + "_"
    return name


#: a torch.fx number suffix (``mul_3``)
_SUFFIX = re.compile(r"^(.*)_(\d+)$")


class LocalNames:
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


def base_name(node: torch.fx.Node) -> str:
    """A node name without torch.fx's numbering (``mul_3`` -> ``mul``) and dynamo's
    ``l_..._`` wrapping of inputs (``l_x_`` -> ``x``)."""
    name = node.name
    match = _SUFFIX.match(name)
    base = match.group(1) if match else name
    if base.startswith("l_") and base.endswith("_"):
        base = base[2:-1]
    return base or "value"


__all__ = ["ILLEGAL", "RESERVED", "LocalNames", "base_name", "escape_name"]
