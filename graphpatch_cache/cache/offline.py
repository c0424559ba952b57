"""The loader's reads of a remote root's refs: one small GET per hit, and hits while the
root cannot be reached.

Each time the loader reads the refs of a key from a remote root (object storage), the local
tier remembers them (only what changed is written). The next lookup of that key in a process
GETs the remembered refs by name instead of listing the key first (:func:`loader_scan`): a
warm hit is one small GET, its blob then served by the local tier. Each ref is read from the
root, so a ref rewritten or removed there is seen; a variant added there since is found by
the listing the loader's second lookup (after a miss, before extracting) makes.

When the root cannot be reached, the loader uses the remembered refs instead, with one
warning per root: a graph whose blob the local tier holds is still a hit (its digest
verified as always, the loader's checks unchanged). A graph the local tier lacks is a miss,
extracted in memory and not cached (``load_cached`` warns that it cannot write). Nothing
here applies to a directory root.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Set, Tuple

from ..errors import RemoteStoreError
from .records import CacheEntry, parse_ref

if TYPE_CHECKING:  # store.py imports this module
    from .store import CacheStore

_WARNED: Set[str] = set()

#: the ref fields the local tier remembers (what ``put`` writes; ``created`` for ``ls``)
_FIELDS = ("digest", "size", "created", "model_class", "schema_version", "versions", "signature", "material",
           "example")


def loader_scan(store: CacheStore, key: str) -> Tuple[List[CacheEntry], List[Tuple[str, str]]]:
    """The refs of ``key`` for the loader: the remembered ones read by name on the first
    lookup of ``key`` by this store (when they still name something), else a full listing."""
    if store.local is not None and store.backend.remote and key not in store._listed:
        store._listed.add(key)
        remembered = store.local.remembered_refs(str(store.root), key)
        if remembered:
            entries, bad = store._read_refs(key, [f"{variant}.json" for variant in sorted(remembered)])
            if entries:
                return entries, bad
    store._listed.add(key)
    return store._scan(key)


def remember_variants(store: CacheStore, key: str, entries: List[CacheEntry]) -> None:
    """Remember the refs of ``key`` just read from a remote root."""
    if store.local is None or not store.backend.remote:
        return
    refs: Dict[str, Any] = {}
    for e in entries:
        refs[e.variant] = {"digest": e.digest, "size": e.size, "created": e.created, "model_class": e.model_class,
                           "versions": e.versions, "signature": e.signature, "material": e.material,
                           "example": e.example}
    store.local.remember_refs(str(store.root), key, refs)


def remembered_variants(store: CacheStore, key: str, exc: RemoteStoreError) -> List[CacheEntry]:
    """The entries of ``key`` the local tier remembers from ``store``'s root, which cannot be
    reached now (``exc``), with one warning per root; none when there is no local tier or it
    tier holds nothing for it: ``load_cached`` then extracts without the cache."""
    root = str(store.root)
    if root not in _WARNED:
        _WARNED.add(root)
        warnings.warn(f"graphpatch_cache: the cache at {root} cannot be reached ({exc.message}); using the graphs "
                      "your local tier holds from it (new graphs are extracted here and not shared until it is "
                      "reachable again)", stacklevel=4)
    refs = store.local.remembered_refs(root, key) if store.local is not None else None
    refs = refs or {}
    entries: List[CacheEntry] = []
    for variant, meta in sorted(refs.items()):
        fields = {k: v for k, v in meta.items() if k in _FIELDS and v is not None} if isinstance(meta, dict) else meta
        entry = parse_ref(key, str(variant), store.location(store._ref_name(key, str(variant))), fields)
        if entry is not None:
            entries.append(entry)
    return entries


__all__ = ["loader_scan", "remember_variants", "remembered_variants"]
