"""Moving a key's graphs between caches: one portable file per key (``export``/``import``).

The file is the portable format (:func:`~graphpatch_cache.artifact.portable_to_bytes`: every
graph variant of the key, pure data, never weights, with the ``sha256`` of the artifacts
list) plus ``key`` (a key cannot be recomputed without the model) and ``provenance``: what
each variant's ref records (the key material less the module/tensor lists, and the example
signature), so the importing cache can prove each graph belongs to the key and rebuild it.
:func:`import_portable` checks everything the loader checks, and that proof, before it
stores anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from .._files import write_atomic
from ..artifact import GraphArtifact, portable_payload, portable_to_bytes
from ..errors import ArtifactFormatError, CacheError, CacheMissError
from ..artifact.signature import signature_key
from ..trust.validate import read_portable
from .keys import environment_fingerprint
from .proof import entry_disagreement
from .records import CacheEntry
from .settings import is_key
from .store import CacheStore


def export_portable(store: CacheStore, key: str, path: Union[str, "os.PathLike[str]", None] = None) -> bytes:
    """Every graph variant of ``key`` (a full key) as one portable file, with provenance;
    also written to ``path`` (atomically: the old file or the whole new one) when given.

    :raises CacheMissError: no variants, or one whose blob is missing or damaged.
    :raises CacheError: a variant does not belong to ``key`` (run ``verify --fix``).
    """
    artifacts, provenance = [], []
    for entry in store.variants(key):
        artifact = store.load_entry(entry)
        if artifact is None:
            raise CacheMissError(f"a graph variant of key {key[:12]} is missing or damaged", path=entry.ref_path,
                                 hint="run `graphpatch-cache verify --fix`, then build it again")
        if entry.material is not None:
            why = entry_disagreement(key, entry.variant, entry.ref(), artifact)
            if why is not None:
                raise CacheError(f"a graph variant of key {key[:12]} does not belong to it: {why}", path=entry.ref_path,
                                 hint="run `graphpatch-cache verify --fix`, then build it again")
        artifacts.append(artifact)
        provenance.append({"material": entry.material, "example": entry.example})
    if not artifacts:
        raise CacheMissError(f"key {key[:12]} has no graph variants", path=str(store.root))
    data = portable_to_bytes(artifacts, key=key, provenance=provenance)
    if path is not None:
        write_atomic(path, data)
    return data


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_portable` stored.

    :ivar proven: every graph carried key material proving it belongs to ``key`` (files
        from ``export``); ``False`` for files from ``pg.save()`` imported with a key.
    """

    key: str
    entries: List[CacheEntry]
    artifacts: List[GraphArtifact]
    proven: bool
    #: every graph was built with this environment's torch, transformers and python, so
    #: ``load_cached`` here can use it (other environments' graphs sit under their own keys)
    matches_environment: bool = True


def import_portable(store: CacheStore, data: bytes, name: str, key: Optional[str] = None) -> ImportResult:
    """Check a portable file as the loader would, prove each graph belongs to the key (the
    file's, or ``key``), then store them all.

    :raises ArtifactFormatError: naming ``name``: damaged, hostile or malformed, no key, or
        a graph that does not belong to the key. Nothing is stored then.
    """
    artifacts = read_portable(data, name)  # sha256, schema, allowlist, argument and structure rules
    payload = portable_payload(data, name)
    if key is None:
        key = payload.get("key")
        if key is None:
            raise ArtifactFormatError(f"{name} holds no cache key (a file written by pg.save()?)", path=name,
                                      hint="pass --key with the full key, or export it with `graphpatch-cache export`")
    if not isinstance(key, str) or not is_key(key.lower()):
        raise ArtifactFormatError(f"{name}: {key!r} is not a cache key", path=name, hint="keys are 64 hex digits")
    key = key.lower()
    provenance = payload.get("provenance")
    if provenance is None:
        provenance = [None] * len(artifacts)
    if not isinstance(provenance, list) or len(provenance) != len(artifacts) or \
            not all(p is None or isinstance(p, dict) for p in provenance):
        raise ArtifactFormatError(f"{name}: malformed provenance", path=name, hint="export the key again")
    records = []
    for i, (artifact, prov) in enumerate(zip(artifacts, provenance)):
        material: Optional[Dict[str, Any]] = prov.get("material") if prov else None
        example = prov.get("example") if prov else None
        if material is not None:
            ref = {"material": material, "signature": artifact.signature, "example": example}
            why = entry_disagreement(key, signature_key(artifact.signature), ref, artifact)
            if why is not None:
                raise ArtifactFormatError(f"{name}: graph variant {i} does not belong to key {key[:12]}: {why}",
                                          path=name, hint="nothing was stored; export the key again from a cache "
                                          "that verifies")
        records.append((artifact, material, example))
    entries = [store.put(key, a, recorded=m, example=e) for a, m, e in records]
    env = environment_fingerprint()
    matches = all(a.versions.get(k) == env.get(k) for a in artifacts for k in ("torch", "transformers", "python"))
    return ImportResult(key=key, entries=entries, artifacts=artifacts,
                        proven=all(m is not None for _, m, _ in records), matches_environment=matches)


__all__ = ["ImportResult", "export_portable", "import_portable"]
