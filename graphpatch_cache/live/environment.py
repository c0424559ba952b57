"""The versions a graph depends on: this package, Python, torch, transformers, and
accelerate/bitsandbytes where a model uses them. Artifacts record them; cache keys hash them."""

from __future__ import annotations

import importlib
import platform
from typing import Dict, Optional

import torch

from .._version import __version__
from ..integrations.accelerate import hook_of


def installed_version(package: str) -> Optional[str]:
    """``package.__version__`` (``"unknown"`` without one), or None where it is not installed."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    return getattr(module, "__version__", "unknown")


def _uses(model: torch.nn.Module, package: str) -> bool:
    return any(
        type(m).__module__.startswith(package) or type(hook_of(m)).__module__.startswith(package)
        for m in model.modules()
    )


def environment_versions(model: Optional[torch.nn.Module] = None) -> Dict[str, Optional[str]]:
    """Versions that determine what a trace produces. With ``model``, accelerate and
    bitsandbytes are added where the model uses them (their layers and hooks change the
    graph); a package that is not installed has the version None."""
    versions: Dict[str, Optional[str]] = {
        "graphpatch_cache": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": installed_version("transformers"),
    }
    if model is not None:
        for package in ("accelerate", "bitsandbytes"):
            if _uses(model, package):
                versions[package] = installed_version(package)
    return versions


__all__ = ["environment_versions", "installed_version"]
