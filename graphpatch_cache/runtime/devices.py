"""Devices at binding: which device a module's graph runs on, and what its recorded device
constants mean there."""

from __future__ import annotations

from typing import Callable, Dict, FrozenSet, Optional, Set, Tuple

import torch


def module_device(module: torch.nn.Module, fallback: Optional[torch.device],
                   memo: Dict[Tuple[int, str], Optional[torch.device]]) -> Optional[torch.device]:
    """The device of the first parameter, else buffer, of ``module`` (its own, then its
    children's, in ``parameters()`` order) not on meta; ``memo``: per module, for one binding
    (a meta model's modules are walked once, not once per ancestor)."""
    for table in ("_parameters", "_buffers"):
        found = _first_device(module, table, memo, set())
        if found is not None:
            return found
    return fallback


def _first_device(module: torch.nn.Module, table: str, memo: Dict[Tuple[int, str], Optional[torch.device]],
                  seen: Set[int]) -> Optional[torch.device]:
    key = (id(module), table)
    if key in memo:
        return memo[key]
    seen.add(id(module))  # (named_modules visits a module once)
    found: Optional[torch.device] = None
    for tensor in getattr(module, table).values():
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            found = tensor.device
            break
    for child in module._modules.values() if found is None else ():
        if child is not None and id(child) not in seen:
            found = _first_device(child, table, memo, seen)
            if found is not None:
                break
    memo[key] = found
    return found


def device_mapper(device: Optional[torch.device], traced_on: FrozenSet[str]) -> Callable[[torch.device], torch.device]:
    def map_device(d: torch.device) -> torch.device:
        # Device constants traced on the meta device (a build from a config) or on the
        # device the example ran on mean "the module's device" here.
        if device is not None and (d.type == "meta" or d.type in traced_on) and d != device:
            return device
        return d

    return map_device


__all__ = ["device_mapper", "module_device"]
