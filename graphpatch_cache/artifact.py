"""The graph artifact: pure data describing the extracted graphs of one model call signature.

This is the only interface between extraction and the runtime (see DESIGN.md). It holds no
tensors, no pickles and no code that is ever executed: call targets are qualified names that
the runtime resolves through an allowlist, and the generated fx code is kept for humans only.

Values inside node arguments are encoded by :func:`encode_value` into JSON-compatible data
and decoded by :func:`decode_value`; node references are ``{"n": name}`` and are resolved by
the caller through ``lookup``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from .errors import ArtifactFormatError, GraphPatchCacheError, SerializationError

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)


@dataclass(frozen=True, kw_only=True)
class NodeData:
    """One fx node. ``target`` is a qualified function name, a method name, a child graph's
    local name or a local attribute name, depending on ``op``."""

    name: str
    op: str
    target: str
    args: Any = ()
    kwargs: Any = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ModuleGraph:
    """The graph of one call of one module.

    :ivar name: the local name of this graph in its parent (``""`` for the root).
    :ivar module_path: qualified name of the module in the model (``transformer.h.0``).
    :ivar kind: ``"compiled"`` (nodes are the module's ops) or ``"opaque"`` (one call of the
        original module, with patchable inputs, outputs, parameters and attributes).
    :ivar attributes: local attribute name -> qualified name of the model parameter, buffer
        or attribute it binds to.
    :ivar input_spec: for opaque graphs, the pytree spec of the forward's ``(args, kwargs)``.
    :ivar call_signature: for a graph called by an opaque module (extracted separately), the
        signature of that call (see :mod:`graphpatch_cache.signature`).
    """

    name: str
    module_path: str
    module_class: str
    kind: str
    call_index: int
    nodes: List[NodeData]
    children: List["ModuleGraph"]
    attributes: Dict[str, str] = field(default_factory=dict)
    input_spec: Optional[str] = None
    call_signature: Optional[Dict[str, Any]] = None
    code: str = ""

    def walk(self):
        """Yield this graph and all descendants, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True, kw_only=True)
class GraphArtifact:
    """Everything needed to rebuild a PatchableGraph for one input signature.

    :ivar signature: the call signature the graphs were extracted for (see
        :mod:`graphpatch_cache.runtime.signature`).
    :ivar input_spec: pytree spec (JSON) of the canonical ``(args, kwargs)`` of the root call.
    :ivar extraction: options fingerprint and the device the graphs were traced on.
    """

    schema_version: int
    model_class: str
    root: ModuleGraph
    signature: Dict[str, Any]
    input_spec: str
    extraction: Dict[str, Any]
    versions: Dict[str, str]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys, no whitespace)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "GraphArtifact":
        if not isinstance(data, dict) or "schema_version" not in data:
            raise GraphPatchCacheError(
                "not a graph artifact: no schema_version field",
                hint="pass a file written by PatchableGraph.save() or the cache",
            )
        version = data["schema_version"]
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise GraphPatchCacheError(
                f"artifact schema_version {version!r} is not supported; this release reads "
                f"{list(SUPPORTED_SCHEMA_VERSIONS)}",
                hint="rebuild the artifact with this release, or upgrade graphpatch-cache",
            )
        try:
            return cls(
                schema_version=version,
                model_class=data["model_class"],
                root=_module_graph_from_dict(data["root"]),
                signature=data["signature"],
                input_spec=data["input_spec"],
                extraction=data["extraction"],
                versions=data["versions"],
            )
        except (KeyError, TypeError) as exc:
            raise GraphPatchCacheError(
                f"malformed graph artifact: {exc!r}", hint="the file is damaged; rebuild it"
            ) from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> "GraphArtifact":
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise GraphPatchCacheError(
                f"not a graph artifact: invalid JSON ({exc})", hint="pass a file written by graphpatch-cache"
            ) from exc
        return cls.from_dict(data)


def _module_graph_from_dict(data: Dict[str, Any]) -> ModuleGraph:
    return ModuleGraph(
        name=data["name"],
        module_path=data["module_path"],
        module_class=data["module_class"],
        kind=data["kind"],
        call_index=data["call_index"],
        nodes=[NodeData(**n) for n in data["nodes"]],
        children=[_module_graph_from_dict(c) for c in data["children"]],
        attributes=dict(data.get("attributes", {})),
        input_spec=data.get("input_spec"),
        call_signature=data.get("call_signature"),
        code=data.get("code", ""),
    )


# ----------------------------------------------------------------------------------------------
# Schema validation

_VALIDATORS: Dict[int, Callable[[Any], Any]] = {}


def schema_text(version: int = SCHEMA_VERSION) -> str:
    """The JSON Schema of ``schema_version`` ``version`` (shipped in the wheel)."""
    from importlib import resources

    return resources.files("graphpatch_cache.cache_schema").joinpath(f"artifact-v{version}.schema.json").read_text()


def validate_artifact(data: Any) -> None:
    """Validate decoded JSON against the artifact's JSON Schema (``cache_schema/``).

    fastjsonschema compiles *our* schema (never the artifact) into a validator once; it is
    one to two orders of magnitude faster than jsonschema on large artifacts.

    :raises GraphPatchCacheError: not an artifact, an unsupported version, or invalid data.
    """
    if not isinstance(data, dict) or "schema_version" not in data:
        raise GraphPatchCacheError("not a graph artifact: no schema_version field",
                                   hint="pass a file written by PatchableGraph.save() or the cache")
    version = data["schema_version"]
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise GraphPatchCacheError(
            f"artifact schema_version {version!r} is not supported; this release reads {list(SUPPORTED_SCHEMA_VERSIONS)}",
            hint="rebuild the artifact with this release, or upgrade graphpatch-cache",
        )
    validator = _VALIDATORS.get(version)
    if validator is None:
        import fastjsonschema

        validator = _VALIDATORS[version] = fastjsonschema.compile(json.loads(schema_text(version)))
    try:
        validator(data)
    except Exception as exc:  # fastjsonschema.JsonSchemaException
        raise GraphPatchCacheError(f"artifact does not match schema_version {version}: {exc}",
                                   hint="the file is damaged or not written by graphpatch-cache") from exc


PORTABLE_FORMAT = "graphpatch-cache-portable"


def artifact_from_bytes(data: bytes, path: str, *, validate: bool = True) -> GraphArtifact:
    """Parse (and validate against ``cache_schema/``) an artifact read from ``path``.

    :raises ArtifactFormatError: not an artifact, an unsupported ``schema_version``, or data
        that does not fit the schema; the error names ``path``.
    """
    payload = parse_json(data, path)
    return _artifact_from_payload(payload, path, validate)


#: no container in an artifact file is longer (a 7B model's structure lists hold ~600 entries;
#: the largest MoE configs stay well below), and none is nested deeper than the parser allows
MAX_JSON_CONTAINER = 500_000
MAX_JSON_ITEMS = 50_000_000


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (writers use allow_nan=False)")


def parse_json(data: bytes, path: str) -> Any:
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


# ----------------------------------------------------------------------------------------------
# Value codec
# ----------------------------------------------------------------------------------------------

_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_MEMORY_FORMATS = {
    str(m).removeprefix("torch."): m
    for m in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)
}
_LAYOUTS = {str(v).removeprefix("torch."): v for v in (torch.strided, torch.sparse_coo)}


def encode_value(value: Any, node_name: Callable[[Any], Optional[str]], encode_callable: Callable[[Any], str]) -> Any:
    """Encode a node argument as JSON data.

    :param node_name: returns the node name for a graph node, ``None`` for anything else.
    :param encode_callable: returns the qualified name of a callable argument.
    :raises SerializationError: for values that have no data form.
    """

    def enc(v: Any) -> Any:
        name = node_name(v)
        if name is not None:
            return {"n": name}
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return v
        if isinstance(v, float):
            return {"f": v.hex()} if not math.isfinite(v) or v != v else {"f": v.hex()}
        if isinstance(v, torch.Size):
            return {"size": [enc(x) for x in v]}
        if isinstance(v, tuple):
            return {"t": [enc(x) for x in v]}
        if isinstance(v, list):
            return {"l": [enc(x) for x in v]}
        if isinstance(v, dict):
            return {"d": [[enc(k), enc(x)] for k, x in v.items()]}
        if isinstance(v, slice):
            return {"s": [enc(v.start), enc(v.stop), enc(v.step)]}
        if v is Ellipsis:
            return {"e": 1}
        if isinstance(v, torch.dtype):
            return {"dtype": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {"device": str(v)}
        if isinstance(v, torch.memory_format):
            return {"mf": str(v).removeprefix("torch.")}
        if isinstance(v, torch.layout):
            return {"layout": str(v).removeprefix("torch.")}
        if isinstance(v, complex):
            return {"c": [v.real.hex(), v.imag.hex()]}
        if callable(v):
            return {"fn": encode_callable(v)}
        raise SerializationError(f"cannot store a value of type {type(v).__name__}: {v!r:.80}")

    return enc(value)


def decode_value(
    data: Any,
    lookup: Callable[[str], Any],
    resolve_callable: Callable[[str], Any],
    map_device: Callable[[torch.device], torch.device] = lambda d: d,
) -> Any:
    """Inverse of :func:`encode_value`. ``lookup`` maps node names to nodes."""

    def dec(v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, dict) and len(v) == 1:
            (tag, x), = v.items()
            if tag == "n":
                return lookup(x)
            if tag == "f":
                return float.fromhex(x)
            if tag == "size":
                return torch.Size([dec(i) for i in x])
            if tag == "t":
                return tuple(dec(i) for i in x)
            if tag == "l":
                return [dec(i) for i in x]
            if tag == "d":
                return {dec(k): dec(i) for k, i in x}
            if tag == "s":
                return slice(*(dec(i) for i in x))
            if tag == "e":
                return Ellipsis
            if tag == "dtype" and x in _DTYPES:
                return _DTYPES[x]
            if tag == "device":
                return map_device(torch.device(x))
            if tag == "mf" and x in _MEMORY_FORMATS:
                return _MEMORY_FORMATS[x]
            if tag == "layout" and x in _LAYOUTS:
                return _LAYOUTS[x]
            if tag == "c":
                return complex(float.fromhex(x[0]), float.fromhex(x[1]))
            if tag == "fn":
                return resolve_callable(x)
        raise SerializationError(f"malformed value in artifact: {v!r:.120}")

    return dec(data)


__all__ = [
    "GraphArtifact",
    "ModuleGraph",
    "NodeData",
    "PORTABLE_FORMAT",
    "SCHEMA_VERSION",
    "artifact_from_bytes",
    "portable_digest",
    "portable_from_bytes",
    "portable_payload",
    "portable_to_bytes",
    "SUPPORTED_SCHEMA_VERSIONS",
    "schema_text",
    "validate_artifact",
    "decode_value",
    "encode_value",
]
