"""graphpatch-cache: activation patching on PyTorch models, with a persistent graph cache.

Wrap a model in :class:`PatchableGraph`, then record or overwrite any intermediate value by
node path inside ``with pg.patch({...}):``; :func:`load_cached` does the same from a graph
store, so the expensive trace happens once per model structure.

The artifact is the only seam between tracing and running::

    model + inputs --extraction.extract--> GraphArtifact --runtime.bind(model)--> bound graphs
                                             (pure data)
                              cache: bytes in a content-addressed store, checked by trust

    PatchableGraph(model, *inputs)   = bind(extract(model, inputs), model)        (compose)
    load_cached(model, *inputs)      = the same, extract memoized by the store    (cache)

Layers, bottom to top; imports point down only (``tests/unit/test_layers.py``)::

    cli/                 the command line; calls this package's public API only
    graphpatch_cache     this face: the public API          compat/  graphpatch's names
    cache/               keys, store + local tier, load_cached, build, verify, export/import
    compose              PatchableGraph = runtime graph + extraction (the one place both meet)
    extraction/          trace -> artifact    |  runtime/   artifact + model -> patchable
                         (never import each other; the artifact passes between them)
    live/                facts from a live model or call: canonical inputs, structure,
                         source digests, versions      |  trust/   allowlist, graph functions,
                                                          the loader's checks
    integrations/        kv_cache, bitsandbytes, accelerate (detected at run time)
    artifact/ patches options      the data: artifact model, codec, format, signature
    errors _compat _files _lazy _version progress   the ground: errors, private torch calls, atomic
                         writes, lazy faces, the version, extraction progress on stderr

Who calls whom: ``PatchableGraph(...)`` -> ``live.inputs`` (canonical inputs) ->
``extraction.extract`` (capture, split, serialize; ``trust`` checks what it writes) -> a
``GraphArtifact`` -> ``runtime.bind`` (``trust`` checks, structure compared, the model's own
tensors bound) -> ``pg.patch`` installs patch slots in the bound graphs. ``load_cached``
computes the key (``cache.keys``), reads the store (``trust.validate.read_artifact`` at the
door, the key proof, ``live.sources`` re-checked) and only on a miss calls extraction through
``compose``. See ARCHITECTURE.md for the call map and where each concept lives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import exports as _exports
from ._version import __version__ as __version__

#: where each public name lives; a part is imported when one of its names is first read, so
#: ``import graphpatch_cache`` stays cheap (the command line lists a cache without torch)
_PARTS = {
    ".artifact": ("GraphArtifact",),
    ".errors": ("AllocatorError", "ArtifactFormatError", "CacheError", "CacheMissError", "DisallowedTargetError",
                "ExtractionError", "GraphPatchCacheError", "ModelStructureError", "NoEquivalentError",
                "NodePathError", "NonTensorPatchError", "NotAValueError", "NewVariantWarning", "NotPicklableError", "OpaqueModuleWarning", "PatchError", "PatchMapError", "ShapeError",
                "ProtectedWriteError", "SerializationError", "SignatureMismatchError", "UnsupportedCacheError",
                "UnsupportedGradientError", "UnusedSubmoduleError"),
    ".options": ("ExtractionOptions",),
    ".progress": ("show_progress",),
    ".patches": ("AddPatch", "CustomPatch", "Patch", "ProbePatch", "RecordPatch", "ReplacePatch", "ZeroPatch"),
    ".compose": ("PatchableGraph",),
    ".runtime": ("NodePath", "SymbolicShape"),
    ".runtime.memory": ("AllocatorSettings", "keep_freed_memory"),
    ".runtime.graph_diff": ("GraphDiff", "diff_graphs"),
    ".runtime.path_check": ("PathReport",),
    ".cache": ("CacheStore", "ExampleSignature", "build", "build_calls", "cache_key", "load_cached"),
    ".trust.allowlist": ("register_target",),
}
__getattr__, __dir__ = _exports(__name__, globals(), _PARTS)

if TYPE_CHECKING:  # the same names, for type checkers
    from .artifact import GraphArtifact
    from .cache import CacheStore, ExampleSignature, build, build_calls, cache_key, load_cached
    from .compose import PatchableGraph
    from .errors import (
        AllocatorError,
        ArtifactFormatError,
        CacheError,
        CacheMissError,
        DisallowedTargetError,
        ExtractionError,
        GraphPatchCacheError,
        ModelStructureError,
        NoEquivalentError,
        NodePathError,
        NonTensorPatchError,
        NotAValueError,
        NewVariantWarning,
        NotPicklableError,
        OpaqueModuleWarning,
        PatchError,
        PatchMapError,
        ProtectedWriteError,
        SerializationError,
        ShapeError,
        SignatureMismatchError,
        UnsupportedCacheError,
        UnsupportedGradientError,
        UnusedSubmoduleError,
    )
    from .options import ExtractionOptions
    from .patches import AddPatch, CustomPatch, Patch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch
    from .progress import show_progress
    from .runtime import NodePath, SymbolicShape
    from .runtime.graph_diff import GraphDiff, diff_graphs
    from .runtime.memory import AllocatorSettings, keep_freed_memory
    from .runtime.path_check import PathReport
    from .trust.allowlist import register_target

__all__ = [
    "AllocatorError",
    "AllocatorSettings",
    "keep_freed_memory",
    "ArtifactFormatError",
    "CacheError",
    "CacheMissError",
    "CacheStore",
    "ExampleSignature",
    "build",
    "build_calls",
    "cache_key",
    "diff_graphs",
    "GraphDiff",
    "PathReport",
    "load_cached",
    "AddPatch",
    "CustomPatch",
    "DisallowedTargetError",
    "ExtractionError",
    "ExtractionOptions",
    "GraphArtifact",
    "GraphPatchCacheError",
    "ModelStructureError",
    "NodePath",
    "SymbolicShape",
    "ShapeError",
    "NoEquivalentError",
    "NodePathError",
    "NonTensorPatchError",
    "NotAValueError",
    "NewVariantWarning",
    "NotPicklableError",
    "OpaqueModuleWarning",
    "Patch",
    "PatchError",
    "PatchMapError",
    "PatchableGraph",
    "ProbePatch",
    "ProtectedWriteError",
    "RecordPatch",
    "ReplacePatch",
    "SerializationError",
    "SignatureMismatchError",
    "UnsupportedCacheError",
    "UnsupportedGradientError",
    "UnusedSubmoduleError",
    "ZeroPatch",
    "register_target",
    "show_progress",
]
