"""load_cached: PatchableGraph with extraction memoized by a :class:`CacheStore`.

``load_cached(model, *inputs)`` is ``PatchableGraph(model, *inputs)`` with the extractor
replaced by :class:`CachingExtractor`: one code path, so a graph from the cache and a fresh
one have identical node paths, outputs and patch behaviour. Graph variants that the
PatchableGraph extracts later (a call with another signature) go through the same extractor
and are cached under their own keys.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from ..integrations import kv_cache
from ..artifact import GraphArtifact
from ..live.sources import sources_unchanged
from ..errors import CacheError
from ..options import ExtractionOptions
from ..compose import PatchableGraph, default_extractor
from ..artifact.signature import SignatureMatcher
from ..live.inputs import canonical_inputs, concrete_signature, flat_inputs
from .keys import digest_of, key_material
from .proof import canonical, disagreement, live_disagreement, recorded_material
from .store import CacheStore

_WARNED_ROOTS: set = set()
_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=4)


@dataclass
class CacheStats:
    """What a :class:`CachingExtractor` did: hits, misses (extractions) and failed writes."""

    hits: int = 0
    misses: int = 0
    write_failures: int = 0
    keys: List[str] = field(default_factory=list)


class CachingExtractor:
    """An extractor (see :data:`~graphpatch_cache.runtime.patchable_graph.Extractor`) that
    looks in ``store`` first and stores what it extracts."""

    def __init__(self, store: CacheStore) -> None:
        self.store = store
        self.stats = CacheStats()

    def _lookup(self, key: str, material: Dict[str, Any], inputs: Any) -> Optional[GraphArtifact]:
        leaves, spec = flat_inputs(inputs)
        recorded_text: Optional[str] = None
        for entry in self.store.variants(key, repair=True):
            try:
                fits = bool(entry.signature) and SignatureMatcher(entry.signature).fits(leaves, spec)
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

    def __call__(self, model: torch.nn.Module, args: tuple, kwargs: dict, options: ExtractionOptions) -> GraphArtifact:
        material = key_material(model, tuple(args), dict(kwargs), options)
        key = digest_of(material)
        self.stats.keys.append(key)
        inputs = canonical_inputs(model, tuple(args), dict(kwargs))
        artifact = self._lookup(key, material, inputs)
        if artifact is not None:
            self.stats.hits += 1
            return artifact
        with self.store.lock(key):
            artifact = self._lookup(key, material, inputs)  # another process may have built it meanwhile
            if artifact is not None:
                self.stats.hits += 1
                return artifact
            artifact = default_extractor(model, args, kwargs, options)
            self.stats.misses += 1
            why = disagreement(material, artifact)
            if why is not None:  # never store an entry that every later hit would refuse
                self.stats.write_failures += 1
                _warn_once(f"graphpatch_cache: not caching the graphs of {type(model).__name__}: {why} "
                           "(a bug in graphpatch-cache; please report it)")
                return artifact
            try:
                self.store.put(key, artifact, material=material, example=concrete_signature(inputs))
            except CacheError as exc:  # the entry would not prove its key: keep it out of the cache
                self.stats.write_failures += 1
                _warn_once(f"graphpatch_cache: not caching the graphs of {type(model).__name__}: {exc.message} "
                           "(a bug in graphpatch-cache; please report it)")
            except OSError as exc:
                self.stats.write_failures += 1
                root = str(self.store.root)
                if root not in _WARNED_ROOTS:
                    _WARNED_ROOTS.add(root)
                    warnings.warn(
                        f"graphpatch_cache: cannot write to the cache at {root} ({exc.strerror or exc}); "
                        "graphs are extracted in memory and not cached",
                        stacklevel=4,
                    )
        return artifact


def _store(cache: Union[CacheStore, str, Any, None]) -> CacheStore:
    if isinstance(cache, CacheStore):
        return cache
    return CacheStore(cache)


def store_and_inputs(cache: Any, store: Any, example_kwargs: dict) -> Tuple[CacheStore, dict]:
    """Resolve ``cache=``, which names our graph cache *and* (transformers >= 5) a model's
    key/value cache argument: with ``store=`` given, ``cache=`` is a model input; without
    it, a transformers ``Cache`` object passed as ``cache=`` is a model input, and anything
    else (a CacheStore, a path, None) is the graph cache."""
    if store is not None:
        if cache is not None:
            example_kwargs = dict(example_kwargs, cache=cache)
        return _store(store), example_kwargs
    if kv_cache.is_cache(cache):
        return _store(None), dict(example_kwargs, cache=cache)
    return _store(cache), example_kwargs


def load_cached(
    model: torch.nn.Module,
    *example_args: Any,
    options: Optional[ExtractionOptions] = None,
    cache: Union[CacheStore, str, Any, None] = None,
    store: Union[CacheStore, str, None] = None,
    **example_kwargs: Any,
) -> PatchableGraph:
    """A :class:`PatchableGraph` for ``model``, from the cache when possible.

    On a hit the artifact is rebuilt and bound to ``model``'s own parameters (no copies); on
    a miss the graphs are extracted, stored and bound. If the cache cannot be written (a
    read-only or full filesystem) the graph is still returned, with one warning.

    :param cache: a :class:`CacheStore`, a root directory, or ``None`` for the default root
        (``$GRAPHPATCH_CACHE_DIR`` or the user cache dir). A transformers ``Cache`` (the
        model's own ``cache=`` argument) is passed to the model instead.
    :param store: the graph cache, as ``cache``; with it, ``cache=`` is always a model input
        (``load_cached(model, store=s, input_ids=ids, cache=kv, use_cache=True)``).
    """
    options = options or ExtractionOptions()
    graph_store, example_kwargs = store_and_inputs(cache, store, example_kwargs)
    extractor = CachingExtractor(graph_store)
    artifact = extractor(model, example_args, example_kwargs, options)
    pg = PatchableGraph.from_artifact(model, artifact, options=options, extractor=extractor)
    pg.cache_stats = extractor.stats
    return pg


__all__ = ["CacheStats", "CachingExtractor", "load_cached"]
