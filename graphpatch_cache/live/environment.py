"""The versions a graph depends on: this package, Python, torch, transformers, and
accelerate/bitsandbytes where a model uses them. Artifacts record them; cache keys hash them."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import platform
import sys
from typing import TYPE_CHECKING, Any, Dict, Optional

from .._version import __version__
from ..artifact.model import SCHEMA_VERSION

if TYPE_CHECKING:  # deferred: `graphpatch-cache info` reports versions without importing torch
    import torch


def installed_version(package: str) -> Optional[str]:
    """The version of ``package``: its ``__version__`` where it is imported already (what runs),
    else its installed distribution's version (without importing it: importing transformers
    costs seconds), ``"unknown"`` without one; None where it is not installed."""
    module = sys.modules.get(package)
    if module is None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            if importlib.util.find_spec(package) is None:
                return None
            module = importlib.import_module(package)  # importable without a distribution (a source tree)
    return getattr(module, "__version__", "unknown")


def _uses(model: torch.nn.Module, package: str) -> bool:
    from ..integrations.accelerate import hook_of  # deferred: imports torch

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
        "torch": installed_version("torch"),
        "transformers": installed_version("transformers"),
    }
    if model is not None:
        for package in ("accelerate", "bitsandbytes"):
            if _uses(model, package):
                versions[package] = installed_version(package)
    return versions


def environment_fingerprint(model: Optional[torch.nn.Module] = None) -> Dict[str, Any]:
    """Versions that enter the key (accelerate/bitsandbytes only where ``model`` uses them)."""
    return {"schema_version": SCHEMA_VERSION, **environment_versions(model)}


__all__ = ["environment_fingerprint", "environment_versions", "installed_version"]
