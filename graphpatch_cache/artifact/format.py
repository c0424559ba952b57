"""The artifact's file formats: bytes <-> :class:`GraphArtifact` for one artifact (the cache's
blobs) and for a portable file of several; JSON parsing with limits and JSON Schema validation
against ``cache_schema/``. Structure only: the trust checks live in :mod:`graphpatch_cache.trust`."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any, Callable, Dict, List, Optional

import fastjsonschema

from .model import SCHEMA_VERSION, SUPPORTED_SCHEMA_VERSIONS, GraphArtifact, check_schema_version
from .._version import __version__
from ..errors import ArtifactFormatError, GraphPatchCacheError


_VALIDATORS: Dict[int, Callable[[Any], Any]] = {}


def schema_text(version: int = SCHEMA_VERSION) -> str:
    """The JSON Schema of ``schema_version`` ``version`` (shipped in the wheel)."""
    return resources.files("graphpatch_cache.cache_schema").joinpath(f"artifact-v{version}.schema.json").read_text()


def validate_artifact(data: Any) -> None:
    """Validate decoded JSON against the artifact's JSON Schema (``cache_schema/``).

    fastjsonschema compiles *our* schema (never the artifact) into a validator once; it is
    one to two orders of magnitude faster than jsonschema on large artifacts.

    :raises GraphPatchCacheError: not an artifact, an unsupported version, or invalid data.
    """
    version = check_schema_version(data)
    validator = _VALIDATORS.get(version)
    if validator is None:
        validator = _VALIDATORS[version] = fastjsonschema.compile(json.loads(schema_text(version)))
    try:
        validator(data)
    except Exception as exc:  # fastjsonschema.JsonSchemaException
        raise GraphPatchCacheError(f"artifact does not match schema_version {version}: {exc}",
                                   hint="the file is damaged or not written by graphpatch-cache") from exc


PORTABLE_FORMAT = "graphpatch-cache-portable"


def artifact_from_bytes(data: bytes, path: str, *, validate: bool = True) -> GraphArtifact:
    """Parse (and validate against ``cache_schema/``) an artifact read from ``path``.

    :param validate: ``False`` only for bytes that passed this very validation before (the
        loader remembers the sha256 of bytes it validated, under :func:`validation_tag`):
        the JSON limits and the JSON Schema are skipped; the schema version is still checked.
    :raises ArtifactFormatError: not an artifact, an unsupported ``schema_version``, or data
        that does not fit the schema; the error names ``path``.
    """
    payload = parse_json(data, path, limits=validate)
    return _artifact_from_payload(payload, path, validate)


_TAG: List[str] = []


def validation_tag() -> str:
    """What a record "these bytes passed :func:`artifact_from_bytes`'s validation" depends
    on: the package version and the text of every JSON Schema this release reads (a changed
    schema makes every record stale)."""
    if not _TAG:
        h = hashlib.sha256(f"graphpatch-cache {__version__}\n".encode())
        for version in SUPPORTED_SCHEMA_VERSIONS:
            h.update(f"schema {version}\n".encode() + schema_text(version).encode() + b"\n")
        _TAG.append(h.hexdigest())
    return _TAG[0]


#: no container in an artifact file is longer (a 7B model's structure lists hold ~600 entries;
#: the largest MoE configs stay well below), and none is nested deeper than the parser allows
MAX_JSON_CONTAINER = 500_000


MAX_JSON_ITEMS = 50_000_000


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (writers use allow_nan=False)")


def parse_json(data: bytes, path: str, *, limits: bool = True) -> Any:
    """JSON text of an artifact file, refused quickly when it is not plausibly one: invalid
    JSON, ``NaN``/``Infinity`` tokens, nesting past the parser's limit, or a container longer
    than :data:`MAX_JSON_CONTAINER` (checked before any slower validation walks it).

    :raises ArtifactFormatError: naming ``path``.
    """
    try:
        payload = json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError, TypeError) as exc:
        raise ArtifactFormatError(f"{path} is not a graph artifact file (invalid JSON: {exc!s:.200})", path=path,
                                  hint="pass a file written by PatchableGraph.save(), `graphpatch-cache export` "
                                  "or the cache") from None
    if not limits:  # (bytes whose limits were checked before; see artifact_from_bytes)
        return payload
    stack, items = [payload], 0
    while stack:
        value = stack.pop()
        if isinstance(value, (list, dict)):
            if len(value) > MAX_JSON_CONTAINER or items > MAX_JSON_ITEMS:
                raise ArtifactFormatError(f"{path} holds a container of {len(value)} elements, more than any "
                                          "artifact", path=path, hint="the file is damaged or hostile")
            items += len(value)
            stack.extend(value.values() if isinstance(value, dict) else value)
    return payload


def _artifact_from_payload(payload: Any, path: str, validate: bool) -> GraphArtifact:
    try:
        if validate:
            validate_artifact(payload)
        return GraphArtifact.from_dict(payload)
    except ArtifactFormatError:
        raise
    except GraphPatchCacheError as exc:
        raise ArtifactFormatError(f"{path}: {exc.message}", path=path, hint=exc.hint) from exc


def portable_digest(items: Any) -> str:
    """The ``sha256`` field of a portable file: of the canonical JSON of its ``artifacts``
    list (sorted keys, no whitespace, no NaN), so any change to a graph changes it."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def portable_to_bytes(
    artifacts: List[GraphArtifact],
    key: Optional[str] = None,
    provenance: Optional[List[Dict[str, Any]]] = None,
) -> bytes:
    """One file holding artifacts (graph variants of one model; never weights) and the
    ``sha256`` of their content; with the cache key they belong under when ``key`` is given,
    and what each entry's ref records (``provenance``, one per artifact) when given
    (``graphpatch-cache export``)."""
    items = [a.to_dict() for a in artifacts]
    payload: Dict[str, Any] = {"format": PORTABLE_FORMAT, "artifacts": items, "sha256": portable_digest(items)}
    if key is not None:
        payload["key"] = key
    if provenance is not None:
        if len(provenance) != len(artifacts):
            raise ValueError("provenance needs one entry per artifact")
        payload["provenance"] = provenance
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


_REEXPORT = ("write it again with this release: pg.save(path), or `graphpatch-cache export KEY -o FILE` from a "
             "cache holding the graphs")


def portable_payload(data: bytes, path: str) -> Dict[str, Any]:
    """The checked top level of a portable file: the wrapper, with an ``artifacts`` list
    whose content matches the file's ``sha256`` (artifacts are not yet validated).

    :raises ArtifactFormatError: naming ``path``: not JSON, not a portable file (a bare
        artifact carries no digest), no ``sha256`` (an older release wrote it), or content
        that does not match it (the file is damaged).
    """
    payload = parse_json(data, path)
    if not isinstance(payload, dict) or payload.get("format") != PORTABLE_FORMAT:
        if isinstance(payload, dict) and "schema_version" in payload:
            raise ArtifactFormatError(f"{path} is a bare graph artifact (a cache blob), not a portable file: it "
                                      "carries no digest, so damage to it could not be detected", path=path,
                                      hint=_REEXPORT)
        raise ArtifactFormatError(f"{path} is not a graph artifact file", path=path,
                                  hint="pass a file written by PatchableGraph.save() or `graphpatch-cache export`")
    items = payload.get("artifacts")
    if not isinstance(items, list) or not items:
        raise ArtifactFormatError(f"{path} holds no artifacts", path=path)
    recorded = payload.get("sha256")
    if recorded is None:
        raise ArtifactFormatError(f"{path} carries no sha256 of its content (written by an older release)", path=path,
                                  hint=_REEXPORT)
    try:
        actual = portable_digest(items)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ArtifactFormatError(f"{path} is not a well-formed graph artifact file ({type(exc).__name__})",
                                  path=path, hint="the file is damaged") from exc
    if not isinstance(recorded, str) or recorded != actual:
        raise ArtifactFormatError(f"{path} is damaged: its content does not match its sha256", path=path,
                                  hint="copy the file again from its source, or " + _REEXPORT)
    return payload


def portable_from_bytes(data: bytes, path: str) -> List[GraphArtifact]:
    """Inverse of :func:`portable_to_bytes` (see :func:`portable_payload` for what is refused).

    :raises ArtifactFormatError: naming ``path``.
    """
    payload = portable_payload(data, path)
    return [_artifact_from_payload(item, path, True) for item in payload["artifacts"]]


__all__ = ["MAX_JSON_CONTAINER", "MAX_JSON_ITEMS", "PORTABLE_FORMAT", "artifact_from_bytes", "parse_json",
           "portable_digest", "portable_from_bytes", "portable_payload", "portable_to_bytes", "schema_text", "validate_artifact",
           "validation_tag"]
