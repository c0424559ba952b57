"""load_cached: PatchableGraph with extraction memoized by a :class:`CacheStore`.

``load_cached(model, *inputs)`` is ``PatchableGraph(model, *inputs)`` with the extractor
replaced by :class:`CachingExtractor`: one code path, so a graph from the cache and a fresh
one have identical node paths, outputs and patch behaviour. Graph variants that the
PatchableGraph extracts later (a call with another signature) go through the same extractor
and are cached under their own keys.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union, cast

import torch

from .. import progress
from ..artifact import GraphArtifact
from ..artifact.signature import SignatureMatcher
from ..compose import PatchableGraph, extract
from ..errors import CacheError
from ..integrations import kv_cache
from ..live.inputs import CallInputs
from ..live.sources import sources_unchanged
from ..options import ON_DEMAND, ExtractionOptions
from .keys import digest_of, key_material
from .proof import canonical, disagreement, live_disagreement, recorded_material
from .store import CacheStore

_WARNED_ROOTS: Set[str] = set()
_WARNED: Set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=5)


@dataclass
class CacheStats:
    """What a :class:`CachingExtractor` did: hits, misses (extractions) and failed writes."""

    hits: int = 0
    misses: int = 0
    write_failures: int = 0
    keys: List[str] = field(default_factory=list)


class CachingExtractor:
    """An extractor (see :data:`~graphpatch_cache.runtime.patchable_graph.Extractor`) that
    looks in ``store`` first and stores what it extracts. ``origin``: what the entries it
    writes say they were built from (display text, see :attr:`CacheEntry.origin`)."""

    def __init__(self, store: CacheStore, origin: str = "python: load_cached") -> None:
        self.store = store
        self.origin = origin
        self.stats = CacheStats()

    def _lookup(self, key: str, material: Dict[str, Any], inputs: CallInputs) -> Optional[GraphArtifact]:
        recorded_text: Optional[str] = None
        for entry in self.store.variants(key, repair=True):
            try:
                fits = bool(entry.signature) and SignatureMatcher(entry.signature).fits(list(inputs.leaves), inputs.spec)
            except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError):
                self.store.quarantine_ref(entry, "malformed signature")  # a ref's spec is data from the root
                continue
            if not fits:
                continue
            artifact = self.store.load_entry(entry)
            if artifact is None:
                continue
            if recorded_text is None:
                recorded_text = canonical(recorded_material(material))
            why = live_disagreement(material, recorded_text, entry.ref(), entry.variant, artifact)
            if why is not None:  # a bug or a hostile write: like a damaged entry, never a failure
                self.store.quarantine_ref(entry, f"an entry that does not belong to key {key[:12]} ({why})")
                continue
            if not sources_unchanged(artifact.extraction.get("sources", {})):
                continue  # a traced file changed since: the graph may be stale, extract anew
            return artifact
        return None

    def __call__(self, model: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                 options: ExtractionOptions) -> GraphArtifact:
        """The extractor protocol (what :class:`PatchableGraph` calls for a new signature)."""
        return self.load(model, CallInputs.of(model, args, kwargs), options)

    def load(self, model: torch.nn.Module, inputs: CallInputs, options: ExtractionOptions,
             material: Optional[Dict[str, Any]] = None) -> GraphArtifact:
        """The artifact for ``model`` called with ``inputs``: from the store, else extracted
        and stored. ``material``: the call's key material, when the caller computed it."""
        if material is None:
            material = key_material(model, options=options, inputs=inputs)
        key = digest_of(material)
        self.stats.keys.append(key)
        artifact = self._lookup(key, material, inputs)
        if artifact is not None:
            self.stats.hits += 1
            return artifact
        # a miss: one progress task for the wait, the extraction (which joins it) and the write
        name = progress.title(type(model).__name__, ON_DEMAND.get() is not None)
        with progress.task(name, options.progress):
            progress.phase("waiting for the cache lock")
            with self.store.lock(key):
                artifact = self._lookup(key, material, inputs)  # another process may have built it meanwhile
                if artifact is not None:
                    self.stats.hits += 1
                    return artifact
                artifact = extract(model, options=options, inputs=inputs)
                self.stats.misses += 1
                progress.phase("storing in the cache")
                self._put(model, key, material, inputs, artifact)
        return artifact

    def _put(self, model: torch.nn.Module, key: str, material: Dict[str, Any], inputs: CallInputs,
             artifact: GraphArtifact) -> None:
        """Store a fresh extraction; a failure is counted and warned about, never raised."""
        why = disagreement(material, artifact)
        if why is not None:  # never store an entry that every later hit would refuse
            self.stats.write_failures += 1
            _warn_once(f"graphpatch_cache: not caching the graphs of {type(model).__name__}: {why} "
                       "(a bug in graphpatch-cache; please report it)")
            return
        try:
            self.store.put(key, artifact, material=material, example=inputs.concrete_signature, origin=self.origin)
        except OSError as exc:  # first: a remote root that cannot be reached is an OSError too
            self.stats.write_failures += 1
            root = str(self.store.root)
            if root not in _WARNED_ROOTS:
                _WARNED_ROOTS.add(root)
                why = exc.message if isinstance(exc, CacheError) else str(exc.strerror or exc)
                warnings.warn(
                    f"graphpatch_cache: cannot write to the cache at {root} ({why}); "
                    "graphs are extracted in memory and not cached",
                    stacklevel=5,
                )
        except CacheError as exc:  # the entry would not prove its key: keep it out of the cache
            self.stats.write_failures += 1
            _warn_once(f"graphpatch_cache: not caching the graphs of {type(model).__name__}: {exc.message} "
                       "(a bug in graphpatch-cache; please report it)")


#: what ``store=`` (and the deprecated ``cache=``) take: a store, a root directory, or None
StoreLike = Union[CacheStore, str, "os.PathLike[str]", None]


def _store(store: StoreLike) -> CacheStore:
    if isinstance(store, CacheStore):
        return store
    return CacheStore(store)


def store_and_inputs(cache: Any, store: StoreLike, example_kwargs: Dict[str, Any],
                     caller: str = "load_cached") -> Tuple[CacheStore, Dict[str, Any]]:
    """Resolve ``store=`` and ``cache=``. ``store=`` names the graph store; ``cache=`` is a
    model's key/value cache argument (transformers >= 5) whenever ``store=`` is given or it
    holds a transformers ``Cache``. Otherwise ``cache=`` is the deprecated name of the graph
    store (a CacheStore or a path): it still works, with a ``DeprecationWarning``."""
    if store is not None:
        if cache is not None:
            example_kwargs = dict(example_kwargs, cache=cache)
        return _store(store), example_kwargs
    if kv_cache.is_cache(cache):
        return _store(None), dict(example_kwargs, cache=cache)
    if cache is not None:
        warnings.warn(f"{caller}(cache=...) for the graph store is deprecated: pass it as store= "
                      "(cache= is a transformers model's key/value cache argument)", DeprecationWarning, stacklevel=3)
    return _store(cache), example_kwargs


@contextlib.contextmanager
def _collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a hit builds hundreds of thousands of
    objects (parsing, graphs): collections triggered by those allocations find no garbage,
    and a full one walks the whole heap (~10 ms of a 32-layer hit). Restored afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_cached(
    model: torch.nn.Module,
    *example_args: Any,
    options: Optional[ExtractionOptions] = None,
    store: StoreLike = None,
    cache: Any = None,
    **example_kwargs: Any,
) -> PatchableGraph:
    """A :class:`PatchableGraph` for ``model``, from the graph store when possible.

    On a hit the artifact is rebuilt and bound to ``model``'s own parameters (no copies); on
    a miss the graphs are extracted, stored and bound. If the store cannot be written (a
    read-only or full filesystem) the graph is still returned, with one warning.

    :param store: a :class:`CacheStore`, a root directory, or ``None`` for the default root
        (``$GRAPHPATCH_CACHE_DIR`` or the user cache dir).
    :param cache: a model input (a transformers ``Cache``, the model's own ``cache=``
        argument: ``load_cached(model, store=s, input_ids=ids, cache=kv, use_cache=True)``).
        Deprecated: a CacheStore or a path as ``cache=`` is the graph store (use ``store=``).
    Options go in ``options=``, or first among the inputs as ``PatchableGraph`` takes them
    (``load_cached(model, ExtractionOptions(...), **inputs)``).
    """
    if example_args and isinstance(example_args[0], ExtractionOptions):
        if options is not None:
            raise TypeError("load_cached got ExtractionOptions twice (positionally and as options=): pass one")
        options, example_args = example_args[0], example_args[1:]
    options = options or ExtractionOptions()
    graph_store, example_kwargs = store_and_inputs(cache, store, example_kwargs)
    extractor = CachingExtractor(graph_store)
    with _collection_paused():
        artifact = extractor.load(model, CallInputs.of(model, example_args, example_kwargs), options)
        pg = cast(PatchableGraph, PatchableGraph.from_artifact(model, artifact, options=options, extractor=extractor))
    setattr(pg, "cache_stats", extractor.stats)  # nn.Module's __setattr__ is typed for tensors and modules only
    return pg


__all__ = ["CacheStats", "CachingExtractor", "StoreLike", "load_cached"]
