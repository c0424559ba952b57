"""What the store reads and reports: a ref's entry (:class:`CacheEntry`), the ref's JSON
parsed and checked field by field, and the reports of ``check`` and ``gc``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from ..errors import RemoteStoreError
from .settings import is_key


@dataclass(frozen=True)
class CacheEntry:
    """One cached graph variant."""

    key: str
    variant: str
    digest: str
    model_class: str
    size: int
    created: float
    versions: Dict[str, str]
    signature: Dict[str, Any] = field(repr=False, default_factory=dict)
    #: where its ref is: a path, or a URL on a remote root
    ref_path: str = ""
    #: the key material the ref records (less the module/tensor lists); None in refs of older releases
    material: Optional[Dict[str, Any]] = field(repr=False, default=None)
    #: the concrete signature of the example inputs the graphs were extracted with
    example: Optional[Dict[str, Any]] = field(repr=False, default=None)
    #: what the entry was built from (a preset, a directory, a Hub id, ``python: load_cached``):
    #: display text written by whoever built it, never used for a decision (:func:`clip_origin`)
    origin: Optional[str] = None

    def ref(self) -> Dict[str, Any]:
        """The ref's fields that the proof (:mod:`~graphpatch_cache.cache.proof`) reads."""
        return {"material": self.material, "signature": self.signature, "example": self.example}


@dataclass(frozen=True)
class Problem:
    """Something :meth:`CacheStore.check` found wrong.

    :ivar kind: ``malformed-ref``, ``missing-blob``, ``corrupt-blob``, ``invalid-artifact``,
        ``wrong-key`` (the entry does not belong to its key), ``unproven`` (its ref records
        no key material: written by an older release, or ``import --key`` of a ``pg.save()``
        file), ``rebuild-differs`` or ``cannot-rebuild`` (``verify --rebuild``).
    """

    path: str
    key: str
    message: str
    variant: str = ""
    kind: str = ""


@dataclass
class CheckReport:
    """What :meth:`CacheStore.check` looked at and found."""

    checked: int = 0
    problems: List[Problem] = field(default_factory=list)
    fixed: bool = False


@dataclass
class GcReport:
    removed: List[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_bytes: int = 0
    dry_run: bool = False


def entry_from_ref(key: str, variant: str, meta: Dict[str, Any], ref: Union[str, "os.PathLike[str]"]) -> CacheEntry:
    """The entry of a ref's fields ``meta`` (as ``put`` writes them)."""
    return CacheEntry(
        key=key,
        variant=variant,
        digest=meta["digest"],
        model_class=str(meta.get("model_class", "?")),
        size=int(meta.get("size", 0)),
        created=float(meta.get("created", 0.0)),
        versions=dict(meta.get("versions", {})),
        signature=dict(meta.get("signature", {})),
        ref_path=os.fspath(ref),
        material=meta.get("material"),
        example=meta.get("example"),
        origin=clip_origin(meta.get("origin")),
    )


#: the longest ``origin`` a ref keeps (display text: a path or a Hub id fits)
ORIGIN_LIMIT = 200


def clip_origin(value: Any) -> Optional[str]:
    """A ref's ``origin`` as it is stored and read: a string of at most :data:`ORIGIN_LIMIT`
    characters (longer ones keep their end, where a path's distinctive part is), else None.
    Any root writer can put text here: it is shown (escaped, see
    :func:`~graphpatch_cache.cache.summary.printable`), never trusted."""
    if not isinstance(value, str) or not value:
        return None
    return value if len(value) <= ORIGIN_LIMIT else "..." + value[-(ORIGIN_LIMIT - 3):]


_REF_TYPES: Dict[str, Union[type, Tuple[type, ...]]] = {
    "size": int, "created": (int, float), "model_class": str, "versions": dict, "signature": dict,
    "material": dict, "example": dict}  # (not ``origin``: display text never makes a ref unusable)


def parse_ref(key: str, variant: str, location: str, meta: Any) -> Optional[CacheEntry]:
    """A ref's entry, or None when it is not a well-formed ref (a digest of 64 hex digits,
    fields of the types ``put`` writes). ``location``: where the ref is (a path or a URL)."""
    if not isinstance(meta, dict) or not is_key(meta.get("digest")):
        return None
    for name, types in _REF_TYPES.items():
        if name in meta and (not isinstance(meta[name], types) or isinstance(meta[name], bool)):
            return None
    return entry_from_ref(key, variant, meta, location)


def read_ref(key: str, variant: str, location: str, read: Callable[[], bytes]) -> Tuple[Optional[CacheEntry], str]:
    """(the entry of the ref that ``read()`` returns, ``""``), or (None, why): ``"gone"``
    (removed meanwhile), ``"unreadable ref"`` or ``"malformed ref"``. Changes nothing.

    :raises RemoteStoreError: the root cannot be reached (not a fact about this ref).
    """
    try:
        meta = json.loads(read())
    except FileNotFoundError:
        return None, "gone"  # removed meanwhile (gc, another process's repair)
    except RemoteStoreError:
        raise
    except (OSError, ValueError, RecursionError):
        return None, "unreadable ref"
    entry = parse_ref(key, variant, location, meta)
    return (entry, "") if entry is not None else (None, "malformed ref")


__all__ = ["ORIGIN_LIMIT", "CacheEntry", "CheckReport", "GcReport", "Problem", "clip_origin", "entry_from_ref", "parse_ref",
           "read_ref"]
