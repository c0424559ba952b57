"""The graph cache: keys, the content-addressed store, and ``load_cached``.

Call map::

    load_cached(model, *inputs)  -> CachingExtractor(store)(model, inputs)
        cache_key(model, inputs) -> store.variants(key) -> signature fits? -> store.load_entry
        hit: proof.live_disagreement? -> quarantine the ref, warn once, go on (a miss)
        miss: store.lock(key) -> extract -> store.put(key, artifact, material=, example=)
      -> PatchableGraph.from_artifact(model, artifact, extractor=the same CachingExtractor)

    store.check(keys, fix=)   read-only without fix: refs, blobs, read_artifact, proof
    verify_rebuild(store, key) -> rebuild.rebuild_artifact (meta device) -> digest comparison
"""

from .build import BuildError, BuildResult, ExampleSignature, build, meta_model
from .keys import cache_key, environment_fingerprint, key_material
from .load import CacheStats, CachingExtractor, load_cached
from .rebuild import RebuildError, RebuildReport, rebuild_artifact, verify_rebuild
from .transfer import ImportResult, export_portable, import_portable
from .store import CacheEntry, CacheStore, CheckReport, GcReport, Problem, default_local_dir, default_root

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
    "CheckReport",
    "GcReport",
    "ImportResult",
    "Problem",
    "RebuildError",
    "RebuildReport",
    "cache_key",
    "default_local_dir",
    "default_root",
    "environment_fingerprint",
    "export_portable",
    "import_portable",
    "key_material",
    "load_cached",
    "rebuild_artifact",
    "verify_rebuild",
]
