"""Extraction options. Frozen and keyword-only: every field that shapes the extracted graphs
is part of the cache key (:meth:`ExtractionOptions.fingerprint`)."""

from __future__ import annotations

import inspect
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type

import torch

#: what ``on_new_variant`` may say
NEW_VARIANT_POLICIES = ("extract", "warn", "error")

#: why the extraction about to start is *on demand* (a call that no graph extracted so far
#: fits: which input differs, and how), set by the runtime around it; None for an extraction
#: the user asked for (``PatchableGraph(...)``, a ``load_cached`` miss, ``build``)
ON_DEMAND: ContextVar[Optional[str]] = ContextVar("graphpatch_cache_on_demand", default=None)
#: True while ``pg.generate`` runs: the step graphs it needs (prompt, one cached token) are
#: extractions its caller asked for, not on-demand ones
GENERATING: ContextVar[bool] = ContextVar("graphpatch_cache_generating", default=False)


def _postprocessing_arity(fn: Callable[..., Any]) -> int:
    """2 for graphpatch's ``fn(graph_module, module)``, 1 for this library's older
    ``fn(graph_module)``; a callable that takes both forms gets graphpatch's."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: assume graphpatch's form
        return 2
    for count in (2, 1):
        try:
            signature.bind(*range(count))
        except TypeError:
            continue
        return count
    raise TypeError(
        f"postprocessing_function {fn!r} must take (graph_module, module), as in graphpatch, or "
        f"(graph_module); its signature is {signature}"
    )


@dataclass(frozen=True, kw_only=True)
class ExtractionOptions:
    """How a model's graphs are extracted (graphpatch's ``ExtractionOptions``, same fields and
    defaults).

    :ivar error_on_compilation_failure: raise :class:`~graphpatch_cache.errors.ExtractionError`
        instead of falling back to an opaque module.
    :ivar warn_on_compilation_failure: warn when a module falls back to opaque.
    :ivar skip_compilation: make every module opaque (its inputs, outputs, parameters and
        attributes stay patchable).
    :ivar classes_to_skip_compiling: module classes that stay opaque (a class, or a tuple, list
        or set of them).
    :ivar allow_unused_submodules: a submodule with parameters that the example inputs never
        call is not an error (parameterless ones, such as a dropout that sdpa attention
        bypasses, never are). Default (None): ``not error_on_compilation_failure``, as in
        graphpatch; the resolved value is what the field holds and what enters the cache key.
    :ivar copy_transformers_generation_config: for a transformers model, ``pg.config`` and
        ``pg.generation_config`` are copies of the model's (``pg.generate`` reads the latter);
        False leaves them None. Acts after binding, so it is not part of the cache key.
    :ivar on_new_variant: what a call that fits none of the graphs extracted so far does when
        its graph is not in the cache either: ``"warn"`` (default: say so before extracting,
        naming the input that differs, old and new, and how to avoid it), ``"extract"``
        (silently), ``"error"`` (raise :class:`~graphpatch_cache.errors.SignatureMismatchError`
        instead). ``pg.generate``'s own step graphs are asked for, never on demand. Not part of
        the cache key.
    :ivar progress: whether an extraction shows its progress on stderr (a tqdm bar in a
        terminal or notebook, one line per phase in a log): None (default) follows
        ``$GRAPHPATCH_CACHE_PROGRESS`` and :func:`~graphpatch_cache.show_progress`, else shows
        it once an extraction has run for 2 s; True shows it at once, False never (see
        :mod:`graphpatch_cache.progress`). A cache hit never shows any. Not part of the cache key.
    :ivar custom_extraction_functions: ``{module class: fn(module) -> torch.fx.Graph}`` for
        modules dynamo cannot handle; the graph's placeholders are the forward's tensor inputs.
    :ivar postprocessing_function: called with the bound root ``torch.fx.GraphModule`` and the
        wrapped model, ``fn(graph_module, module)`` as in graphpatch (a function taking only
        ``fn(graph_module)``, this library's older form, is still called with that). It runs
        each time graphs are bound (each call signature, each load from the cache or a
        file), so its edits apply to every graph; nodes it adds are not node paths.
    """

    error_on_compilation_failure: bool = False
    warn_on_compilation_failure: bool = False
    skip_compilation: bool = False
    classes_to_skip_compiling: Tuple[Type[torch.nn.Module], ...] = ()
    allow_unused_submodules: Optional[bool] = None
    copy_transformers_generation_config: bool = True
    custom_extraction_functions: Mapping[Type[torch.nn.Module], Callable[[torch.nn.Module], torch.fx.Graph]] = field(
        default_factory=dict
    )
    postprocessing_function: Optional[Callable[..., None]] = None
    on_new_variant: str = "warn"
    progress: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.on_new_variant not in NEW_VARIANT_POLICIES:
            raise ValueError(f"on_new_variant must be one of {', '.join(map(repr, NEW_VARIANT_POLICIES))}, "
                             f"got {self.on_new_variant!r}")
        if self.progress not in (None, True, False):
            raise TypeError(f"progress must be None, True or False, got {self.progress!r}")
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
        if self.allow_unused_submodules is None:
            # graphpatch's default: strict mode (errors on failures) also refuses unused modules
            object.__setattr__(self, "allow_unused_submodules", not self.error_on_compilation_failure)
        if self.postprocessing_function is not None:
            if not callable(self.postprocessing_function):
                raise TypeError(f"postprocessing_function must be callable, got {self.postprocessing_function!r}")
            # refuse a wrong signature now; kept for run_postprocessing (it runs at every bind)
            object.__setattr__(self, "_postprocessing_arity", _postprocessing_arity(self.postprocessing_function))

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def run_postprocessing(self, graph_module: torch.fx.GraphModule, module: torch.nn.Module) -> None:
        """Call :attr:`postprocessing_function` (if any) in the form it takes."""
        fn = self.postprocessing_function
        if fn is None:
            return
        if self.__dict__["_postprocessing_arity"] == 2:  # (set in __post_init__: not a dataclass field)
            fn(graph_module, module)
        else:
            fn(graph_module)

    def fingerprint(self) -> Dict[str, Any]:
        """A JSON-able description of the options (the part of the cache key they make).

        ``copy_transformers_generation_config``, ``on_new_variant`` and ``progress`` are left
        out: they never change a graph.
        """

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


__all__ = ["ExtractionOptions", "GENERATING", "NEW_VARIANT_POLICIES", "ON_DEMAND"]
