"""Every error the library raises derives from :class:`GraphPatchCacheError`.

Errors carry the fields a caller needs to act on them (``node_path``, ``path``, ``hint``) and
stay picklable, so they survive multiprocessing and test runners.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Sequence


class GraphPatchCacheError(Exception):
    """Base class of all library errors.

    :param message: what went wrong.
    :param hint: how to fix it; appended to the message.
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\nHint: {hint}")

    def __reduce__(self):  # keep keyword-only fields picklable
        return (_rebuild, (type(self), self.__dict__.copy()))


def _rebuild(cls, state):
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    Exception.__init__(obj, str(state.get("message")) if state.get("hint") is None
                       else f"{state['message']}\nHint: {state['hint']}")
    return obj


class ExtractionError(GraphPatchCacheError):
    """Graph extraction failed (and the options asked us not to fall back to opaque).

    :ivar module_path: the module whose extraction failed ("" for the root).
    """

    def __init__(self, message: str, *, module_path: str = "", hint: str | None = None) -> None:
        self.module_path = module_path
        super().__init__(message, hint=hint)


class UnusedSubmoduleError(ExtractionError):
    """Some submodules were never called by the example inputs."""


class SerializationError(GraphPatchCacheError):
    """A graph could not be turned into (or read back from) pure data.

    :ivar node_path: the node whose data could not be encoded or resolved.
    :ivar target: the offending call target, where there is one.
    """

    def __init__(
        self, message: str, *, node_path: str = "", target: str = "", hint: str | None = None
    ) -> None:
        self.node_path = node_path
        self.target = target
        super().__init__(message, hint=hint)


class DisallowedTargetError(SerializationError):
    """An artifact names a call target, method, attribute or argument outside the allowlist
    and its rules; nothing was executed."""


class ProtectedWriteError(DisallowedTargetError):
    """A graph tried to write into one of the model's parameters; the write did not happen."""


class NodePathError(GraphPatchCacheError, KeyError, ValueError):
    """An unknown node path. Lists the closest existing paths.

    A ``KeyError`` (what graphpatch raises for an unknown path) and a ``ValueError`` (what it
    raises for a bad patch map), so graphpatch users' ``except`` clauses keep working.

    :ivar node_path: the path that was asked for.
    :ivar suggestions: close matches, best first.
    """

    def __init__(
        self, message: str, *, node_path: str, suggestions: Sequence[str] = (), hint: str | None = None
    ) -> None:
        self.node_path = node_path
        self.suggestions = list(suggestions)
        super().__init__(message, hint=hint)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return Exception.__str__(self)


class NotAValueError(NodePathError):
    """A node path stops at a module graph instead of a value."""


class ShapeError(GraphPatchCacheError, ValueError):
    """A recorded symbolic shape cannot be made concrete: the inputs do not fit the graph,
    or a size does not follow from them."""


class PatchError(GraphPatchCacheError, ValueError):
    """A patch could not be applied to the value at its node. A ``ValueError``, so code
    written for graphpatch (``except ValueError``) keeps catching it.

    :ivar node_path: where the patch was applied.
    """

    def __init__(self, message: str, *, node_path: str, hint: str | None = None) -> None:
        self.node_path = node_path
        super().__init__(message, hint=hint)


class NonTensorPatchError(PatchError, TypeError):
    """``pg.patch`` put a patch that writes tensors (a ZeroPatch, a ReplacePatch of a tensor...)
    on a node whose value is a Python number (a batch size, a flag). Raised when the patch is
    entered, not later in the forward pass. Which patch may apply to such a node:
    :func:`graphpatch_cache.patches.number_refusal`.

    :ivar value_type: the node's value type (``int``, ``float``, ``bool``, ``SymInt``...).
    """

    def __init__(self, message: str, *, node_path: str, value_type: str, hint: str | None = None) -> None:
        self.value_type = value_type
        super().__init__(message, node_path=node_path, hint=hint)


class UnsupportedGradientError(GraphPatchCacheError, RuntimeError):
    """A backward pass reached a value the graph cannot differentiate as the model does: the
    output of a custom ``torch.autograd.Function`` whose forward the graph runs inline (its
    ``backward`` is the model's own code, which an artifact does not hold). A ``RuntimeError``,
    as autograd's own refusals are.

    :ivar function: the Function's class name, as the model's source wrote it.
    """

    def __init__(self, message: str, *, function: str = "", hint: str | None = None) -> None:
        self.function = function
        super().__init__(message, hint=hint)


class PatchMapError(GraphPatchCacheError, TypeError, ValueError):
    """``pg.patch()`` got something other than ``{node path: Patch or list of Patches}``.

    A ``TypeError`` (what this library raised before) and a ``ValueError`` (what graphpatch
    raises for the same mistake).

    :ivar node_path: the key whose value is wrong ("" where the map itself is).
    """

    def __init__(self, message: str, *, node_path: str = "", hint: str | None = None) -> None:
        self.node_path = node_path
        super().__init__(message, hint=hint)


class NotPicklableError(GraphPatchCacheError, TypeError):
    """A :class:`~graphpatch_cache.PatchableGraph` was pickled (``torch.save(pg)``,
    ``pickle.dumps(pg)``, ``copy.copy(pg)``). It holds generated code bound to a live model,
    so it is saved as pure data with ``pg.save(file)`` and bound again with
    ``PatchableGraph.load(file, model)``. A ``TypeError``, as pickle raises for objects it
    cannot pickle."""


class NoEquivalentError(GraphPatchCacheError, NotImplementedError):
    """A name from graphpatch's API that has no equivalent here; the message names what to
    use instead.

    :ivar name: the graphpatch name that was used.
    """

    def __init__(self, message: str, *, name: str = "", hint: str | None = None) -> None:
        self.name = name
        super().__init__(message, hint=hint)


class ModelStructureError(GraphPatchCacheError):
    """An artifact was extracted from a model whose structure differs from the one bound.

    :ivar node_path: the graph that does not fit.
    """

    def __init__(self, message: str, *, node_path: str = "", hint: str | None = None) -> None:
        self.node_path = node_path
        super().__init__(message, hint=hint)


class CacheError(GraphPatchCacheError):
    """A cache operation failed.

    :ivar path: the file or directory concerned.
    """

    def __init__(self, message: str, *, path: str = "", hint: str | None = None) -> None:
        self.path = path
        super().__init__(message, hint=hint)


class CacheMissError(CacheError, KeyError):
    """A key, key prefix or file that is not in the cache."""

    def __str__(self) -> str:
        return Exception.__str__(self)


class ArtifactFormatError(CacheError):
    """A file is not a graph artifact this release reads (bad JSON, schema, version)."""


class RemoteStoreError(CacheError, OSError):
    """A cache root on object storage (an fsspec URL such as ``s3://bucket/prefix``) cannot be
    used: unreachable, refused, or its filesystem package is not installed. Also an
    ``OSError``, so a write that fails this way is handled like a read-only filesystem's
    (``load_cached`` warns once and returns the graph it extracted)."""


class SignatureMismatchError(GraphPatchCacheError):
    """A call does not match the inputs the graph was extracted for."""


class UnsupportedCacheError(SignatureMismatchError):
    """A key/value cache of a kind that cannot go through an extracted graph.

    :ivar cache_class: the class of the cache (or cache layer) that is not supported.
    """

    def __init__(self, message: str, *, cache_class: str = "", hint: str | None = None) -> None:
        self.cache_class = cache_class
        super().__init__(message, hint=hint)


def close_matches(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The ``n`` candidates closest to ``word``, best first (also substring matches)."""
    pool = list(candidates)
    found = difflib.get_close_matches(word, pool, n=n, cutoff=0.5)
    tail = word.rsplit(".", 1)[-1]
    for cand in pool:
        if len(found) >= n:
            break
        if cand not in found and tail and cand.endswith("." + tail):
            found.append(cand)
    return found


__all__ = [
    "ArtifactFormatError",
    "CacheError",
    "CacheMissError",
    "DisallowedTargetError",
    "ExtractionError",
    "GraphPatchCacheError",
    "ModelStructureError",
    "NoEquivalentError",
    "NodePathError",
    "NonTensorPatchError",
    "NotAValueError",
    "NotPicklableError",
    "PatchError",
    "PatchMapError",
    "RemoteStoreError",
    "ProtectedWriteError",
    "SerializationError",
    "ShapeError",
    "SignatureMismatchError",
    "UnsupportedCacheError",
    "UnsupportedGradientError",
    "UnusedSubmoduleError",
    "close_matches",
]


class BuildError(GraphPatchCacheError):
    """A build request cannot be carried out (unknown config class, missing package...)."""


class RebuildError(BuildError):
    """An entry cannot be rebuilt here (not a transformers model, options naming code, an
    entry of an older release, another environment, a device this machine lacks...)."""


__all__ += ["BuildError", "RebuildError"]


class AllocatorError(GraphPatchCacheError, RuntimeError):
    """The process's C allocator cannot be tuned from here (not glibc, or it refused a setting)."""


__all__ += ["AllocatorError"]


class NewVariantWarning(UserWarning):
    """A call fits none of the graphs extracted so far, and a new graph variant is being
    extracted for it (``ExtractionOptions.on_new_variant``)."""


__all__ += ["NewVariantWarning"]


class OpaqueModuleWarning(UserWarning):
    """Modules that could not be compiled stay opaque: the ops inside them are not nodes."""


__all__ += ["OpaqueModuleWarning"]
