"""A model's structure as data: module paths and types, tensor names, shapes, dtypes, ties.

Used by the cache key (:mod:`graphpatch_cache.cache.keys`) and recorded in every artifact,
so binding an artifact to a differently structured model fails with an error that names the
first module or tensor that differs, instead of running a graph that does not fit.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ..integrations.bitsandbytes import stored_dtype
from ..artifact.names import qualname


def module_list(model: torch.nn.Module) -> List[List[str]]:
    return [[name, qualname(type(m))] for name, m in model.named_modules(remove_duplicate=False)]


def tensor_list(model: torch.nn.Module) -> List[List[Any]]:
    first_name: Dict[int, str] = {}
    tensors = []
    for kind, named in (("param", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            tied = first_name.setdefault(id(tensor), name)
            tensors.append([kind, name, list(tensor.shape), str(stored_dtype(tensor)), None if tied == name else tied])
    return tensors


def structure(model: torch.nn.Module) -> Dict[str, Any]:
    return {"modules": module_list(model), "tensors": tensor_list(model)}


def first_difference(recorded: Dict[str, Any], live: Dict[str, Any]) -> Optional[str]:
    """A sentence naming the first module or tensor that differs, or None."""
    want_m = {name: cls for name, cls in recorded.get("modules", [])}
    have_m = {name: cls for name, cls in live.get("modules", [])}
    for name, cls in want_m.items():
        if name not in have_m:
            return f"module {name or '<root>'!r} ({cls}) is missing from this model"
        if have_m[name] != cls:
            return f"module {name or '<root>'!r} is a {have_m[name]} here but was a {cls}"
    for name in have_m:
        if name not in want_m:
            return f"this model has a module {name!r} that the extracted model did not"
    want_t = {t[1]: t for t in recorded.get("tensors", [])}
    have_t = {t[1]: t for t in live.get("tensors", [])}
    for name, t in want_t.items():
        if name not in have_t:
            return f"{t[0]} {name!r} is missing from this model"
        h = have_t[name]
        if h[2] != t[2] or h[3] != t[3]:
            return f"{t[0]} {name!r} has shape {tuple(h[2])} and {h[3]} here but had shape {tuple(t[2])} and {t[3]}"
        if h[4] != t[4]:
            return f"{t[0]} {name!r} is tied to {h[4]!r} here but was tied to {t[4]!r}"
    for name in have_t:
        if name not in want_t:
            return f"this model has a tensor {name!r} that the extracted model did not"
    return None


__all__ = ["first_difference", "module_list", "structure", "tensor_list"]
