"""How artifacts spell names: a class or function as its module-qualified name, and a path of
module graphs and nodes joined with ``.`` (the root's path is ``""``)."""

from __future__ import annotations

from typing import Any


def qualname(obj: Any) -> str:
    """``module.QualName`` of a class or function (``transformers.models.gpt2.modeling_gpt2.GPT2MLP``)."""
    return f"{obj.__module__}.{obj.__qualname__}"


def join_path(prefix: str, name: str) -> str:
    """``prefix.name``, or ``name`` under the root (whose path is ``""``)."""
    return f"{prefix}.{name}" if prefix else name


__all__ = ["join_path", "qualname"]
