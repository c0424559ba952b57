"""Extraction options. Frozen and keyword-only: every field is part of the cache key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Tuple, Type

import torch


@dataclass(frozen=True, kw_only=True)
class ExtractionOptions:
    """How a model's graphs are extracted.

    :ivar error_on_compilation_failure: raise :class:`~graphpatch_cache.errors.ExtractionError`
        instead of falling back to an opaque module.
    :ivar warn_on_compilation_failure: warn when a module falls back to opaque.
    :ivar skip_compilation: make every module opaque (its inputs, outputs, parameters and
        attributes stay patchable).
    :ivar classes_to_skip_compiling: module classes that stay opaque.
    :ivar allow_unused_submodules: a submodule with parameters that the example inputs never
        call is not an error (parameterless ones, such as a dropout that sdpa attention
        bypasses, never are).
    :ivar custom_extraction_functions: ``{module class: fn(module) -> torch.fx.Graph}`` for
        modules dynamo cannot handle; the graph's placeholders are the forward's tensor inputs.
    :ivar postprocessing_function: called with the finished root ``torch.fx.GraphModule``.
    """

    error_on_compilation_failure: bool = False
    warn_on_compilation_failure: bool = False
    skip_compilation: bool = False
    classes_to_skip_compiling: Tuple[Type[torch.nn.Module], ...] = ()
    allow_unused_submodules: bool = False
    custom_extraction_functions: Mapping[Type[torch.nn.Module], Callable[[torch.nn.Module], torch.fx.Graph]] = field(
        default_factory=dict
    )
    postprocessing_function: Optional[Callable[[Any], None]] = None

    def __post_init__(self) -> None:
        classes = self.classes_to_skip_compiling
        if isinstance(classes, type):
            classes = (classes,)
        object.__setattr__(self, "classes_to_skip_compiling", tuple(classes))
        for cls in self.classes_to_skip_compiling:
            if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
                raise TypeError(f"classes_to_skip_compiling holds {cls!r}, which is not an nn.Module class")
        if not isinstance(self.custom_extraction_functions, Mapping):
            raise TypeError("custom_extraction_functions must be a mapping {module class: function}")
        object.__setattr__(self, "custom_extraction_functions", dict(self.custom_extraction_functions))

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def fingerprint(self) -> dict:
        """A JSON-able description of the options (the part of the cache key they make)."""

        def qual(obj: Any) -> str:
            return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"

        return {
            "error_on_compilation_failure": self.error_on_compilation_failure,
            "warn_on_compilation_failure": self.warn_on_compilation_failure,
            "skip_compilation": self.skip_compilation,
            "classes_to_skip_compiling": sorted(qual(c) for c in self.classes_to_skip_compiling),
            "allow_unused_submodules": self.allow_unused_submodules,
            "custom_extraction_functions": sorted(
                f"{qual(k)}={qual(v)}" for k, v in self.custom_extraction_functions.items()
            ),
            "postprocessing_function": None if self.postprocessing_function is None else qual(self.postprocessing_function),
        }


__all__ = ["ExtractionOptions"]
