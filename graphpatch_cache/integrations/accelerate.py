"""accelerate's hooks (device maps, CPU/disk offload), detected at run time.

accelerate wraps a module's ``forward`` and keeps its hook on ``module._hf_hook`` (and the
original forward on ``module._old_forward``); nothing here imports accelerate.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def hook_of(module: torch.nn.Module) -> Optional[Any]:
    """``module``'s own accelerate hook, or None."""
    return getattr(module, "_hf_hook", None)


def is_hooked(model: torch.nn.Module) -> bool:
    """Whether ``model`` or any module inside it carries an accelerate hook."""
    return any(hook_of(m) is not None for m in model.modules())


def original_forward(module: torch.nn.Module, forward: Any) -> Any:
    """The forward accelerate wrapped (its ``_old_forward``), or ``forward`` for an unhooked
    module."""
    return module.__dict__.get("_old_forward", forward) if hasattr(module, "_hf_hook") else forward


__all__ = ["hook_of", "is_hooked", "original_forward"]
