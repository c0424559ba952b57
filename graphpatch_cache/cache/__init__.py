"""The graph cache: keys, the content-addressed store, and ``load_cached``.

Call map::

    load_cached(model, *inputs, store=)  -> CallInputs.of(model, inputs)   (canonical, once)
      -> CachingExtractor(store).load(model, call)
        key_material(call) -> store.variants(key) -> signature fits? -> store.load_entry
        hit: proof.live_disagreement? -> quarantine the ref, warn once, go on (a miss)
        miss: store.lock(key) -> extract(call) -> store.put(key, artifact, material=, example=)
      -> PatchableGraph.from_artifact(model, artifact, extractor=the same CachingExtractor)

    store.check(keys, fix=)   (maintenance.py) read-only without fix: refs, blobs, read_artifact, proof
    verify_rebuild(store, key) -> rebuild.rebuild_artifact (meta device) -> digest comparison

Modules: settings (default roots, units, the key pattern), records (entries, reports),
store (put/get/read/lock/layout), backend (a root: a directory) and remote (a root at an
fsspec URL: s3://, gs://, memory://), offline (hits while a remote root is unreachable), sync
(entries between two roots), maintenance (check/remove/gc), locking, local (the per-user
tier), keys, proof, load, builder, call_shapes (the calls a default build makes), rebuild,
transfer (export/import), summary (what an artifact holds, for the CLI).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports as _exports

#: where each name lives; a part is imported when one of its names is first read (see _lazy)
_PARTS = {
    '..artifact': ('SUPPORTED_SCHEMA_VERSIONS',),
    '..errors': ('BuildError', 'RebuildError',),
    '..integrations.transformers': ('DEVICE_MAP_STRATEGIES', 'check_device_map', 'meta_model',),
    '.builder': ('BuildResult', 'ExampleSignature', 'build',),
    '.call_shapes': ('CallShape', 'ShapeBuild', 'build_calls', 'call_keys', 'default_call_shapes', 'serving_entry',),
    '.keys': ('cache_key', 'key_material',),
    '..live.environment': ('environment_fingerprint',),
    '.load': ('CacheStats', 'CachingExtractor', 'StoreLike', 'load_cached',),
    '.maintenance': ('ArtifactCheck',),
    '.rebuild': ('RebuildReport', 'check_rebuilds', 'rebuild_artifact', 'verify_rebuild',),
    '.records': ('CacheEntry', 'CheckReport', 'GcReport', 'Problem',),
    '.settings': ('default_local_dir', 'default_root', 'is_key', 'parse_duration', 'parse_size',),
    '.store': ('CacheStore',),
    '.summary': ('FREE_SIZE', 'artifact_summary', 'call_shape', 'check_node_tree', 'describe_call_shape', 'entry_dtype',
                 'model_dtype', 'node_tree', 'printable',),
    '.sync': ('SyncReport', 'sync',),
    '.transfer': ('ImportResult', 'export_portable', 'import_portable',),
}
__getattr__, __dir__ = _exports(__name__, globals(), _PARTS)

if TYPE_CHECKING:  # the same names, for type checkers
    from ..artifact import SUPPORTED_SCHEMA_VERSIONS
    from ..errors import BuildError, RebuildError
    from ..integrations.transformers import DEVICE_MAP_STRATEGIES, check_device_map, meta_model
    from .builder import BuildResult, ExampleSignature, build
    from .call_shapes import CallShape, ShapeBuild, build_calls, call_keys, default_call_shapes, serving_entry
    from ..live.environment import environment_fingerprint
    from .keys import cache_key, key_material
    from .load import CacheStats, CachingExtractor, StoreLike, load_cached
    from .maintenance import ArtifactCheck
    from .rebuild import RebuildReport, check_rebuilds, rebuild_artifact, verify_rebuild
    from .records import CacheEntry, CheckReport, GcReport, Problem
    from .settings import default_local_dir, default_root, is_key, parse_duration, parse_size
    from .store import CacheStore
    from .summary import (FREE_SIZE, artifact_summary, call_shape, check_node_tree, describe_call_shape, entry_dtype,
                          model_dtype, node_tree, printable)
    from .sync import SyncReport, sync
    from .transfer import ImportResult, export_portable, import_portable

__all__ = [
    "ArtifactCheck",
    "BuildError",
    "BuildResult",
    "CacheEntry",
    "CacheStats",
    "CacheStore",
    "CachingExtractor",
    "CallShape",
    "CheckReport",
    "DEVICE_MAP_STRATEGIES",
    "FREE_SIZE",
    "ExampleSignature",
    "GcReport",
    "ImportResult",
    "Problem",
    "RebuildError",
    "RebuildReport",
    "ShapeBuild",
    "SUPPORTED_SCHEMA_VERSIONS",
    "StoreLike",
    "SyncReport",
    "artifact_summary",
    "build",
    "build_calls",
    "call_keys",
    "cache_key",
    "call_shape",
    "check_device_map",
    "check_node_tree",
    "check_rebuilds",
    "default_call_shapes",
    "describe_call_shape",
    "default_local_dir",
    "default_root",
    "entry_dtype",
    "environment_fingerprint",
    "export_portable",
    "import_portable",
    "is_key",
    "key_material",
    "load_cached",
    "meta_model",
    "model_dtype",
    "node_tree",
    "parse_duration",
    "parse_size",
    "printable",
    "rebuild_artifact",
    "serving_entry",
    "sync",
    "verify_rebuild",
]
