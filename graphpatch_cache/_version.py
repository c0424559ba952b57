"""The package's version, and the versions of the environment that a graph depends on."""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__"]
