"""graphpatch-cache: activation patching on PyTorch models, with a persistent graph cache.

Wrap a model in :class:`PatchableGraph`, then record or overwrite any intermediate value by
node path inside ``with pg.patch({...}):``.
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
    NotAValueError,
    NotPicklableError,
    PatchError,
    PatchMapError,
    ShapeError,
    ProtectedWriteError,
    SerializationError,
    SignatureMismatchError,
    UnsupportedCacheError,
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
    "UnusedSubmoduleError",
    "ZeroPatch",
    "register_target",
]
