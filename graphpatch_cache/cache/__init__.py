"""The graph cache: keys, the content-addressed store, and ``load_cached``.

Call map::

    load_cached(model, *inputs)  -> CachingExtractor(store)(model, inputs)
        cache_key(model, inputs) -> store.variants(key) -> signature fits? -> store.load_entry
        miss: store.lock(key) -> extract -> store.put(key, artifact)
      -> PatchableGraph.from_artifact(model, artifact, extractor=the same CachingExtractor)
"""

from .build import BuildError, BuildResult, ExampleSignature, build, meta_model
from .keys import cache_key, environment_fingerprint, key_material
from .load import CacheStats, CachingExtractor, load_cached
from .store import CacheEntry, CacheStore, GcReport, Problem, default_local_dir, default_root

__all__ = [
    "BuildError",
    "BuildResult",
    "ExampleSignature",
    "build",
    "meta_model",
    "CacheEntry",
    "CacheStats",
    "CacheStore",
    "CachingExtractor",
    "GcReport",
    "Problem",
    "cache_key",
    "default_local_dir",
    "default_root",
    "environment_fingerprint",
    "key_material",
    "load_cached",
]
