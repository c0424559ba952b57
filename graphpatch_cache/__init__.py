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
    errors _compat _files _version the ground: errors, private torch calls, atomic writes

Who calls whom: ``PatchableGraph(...)`` -> ``live.inputs`` (canonical inputs) ->
``extraction.extract`` (capture, split, serialize; ``trust`` checks what it writes) -> a
``GraphArtifact`` -> ``runtime.bind`` (``trust`` checks, structure compared, the model's own
tensors bound) -> ``pg.patch`` installs patch slots in the bound graphs. ``load_cached``
computes the key (``cache.keys``), reads the store (``trust.validate.read_artifact`` at the
door, the key proof, ``live.sources`` re-checked) and only on a miss calls extraction through
``compose``. See ARCHITECTURE.md for the call map and where each concept lives.
"""

from __future__ import annotations

from ._version import __version__ as __version__

from .trust import functions as _functions  # noqa: F401  (registers the graph functions as call targets)
from .artifact import GraphArtifact
from .errors import (
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
    NotPicklableError,
    PatchError,
    PatchMapError,
    ShapeError,
    ProtectedWriteError,
    SerializationError,
    SignatureMismatchError,
    UnsupportedCacheError,
    UnsupportedGradientError,
    UnusedSubmoduleError,
)
from .options import ExtractionOptions
from .patches import AddPatch, CustomPatch, Patch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch
from .compose import PatchableGraph
from .runtime import NodePath, SymbolicShape
from .cache import CacheStore, ExampleSignature, build, cache_key, load_cached
from .trust.allowlist import register_target

__all__ = [
    "ArtifactFormatError",
    "CacheError",
    "CacheMissError",
    "CacheStore",
    "ExampleSignature",
    "build",
    "cache_key",
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
    "NotPicklableError",
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
]
