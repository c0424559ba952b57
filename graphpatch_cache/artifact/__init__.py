"""The artifact: pure data describing the extracted graphs of one model call signature.

This package is the only interface between extraction and the runtime (ARCHITECTURE.md):
extraction writes a :class:`GraphArtifact`, the runtime binds one, and the cache stores its
bytes. It holds no tensors, no pickles and no code that is ever executed: call targets are
qualified names that the trust layer resolves through an allowlist, and the generated fx
code is kept for humans only. It imports nothing of the library above :mod:`errors` and
:mod:`_compat`, and does no I/O beyond bytes and text.

- :mod:`.model`: the dataclasses and the schema version.
- :mod:`.codec`: node argument values <-> JSON-compatible data.
- :mod:`.format`: bytes <-> artifacts (one artifact, or a portable file of several), JSON
  limits and JSON Schema validation.
- :mod:`.signature`: call signatures as data, and the one rule for whether a call fits one.
- :mod:`.names`: how names are spelled (``module.QualName``, dotted paths).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports as _exports

#: where each name lives; a part is imported when one of its names is first read (see _lazy)
_PARTS = {
    '.codec': ('decode_value', 'encode_value',),
    '.format': ('PORTABLE_FORMAT', 'artifact_from_bytes', 'parse_json', 'portable_digest', 'portable_from_bytes', 'portable_payload', 'portable_to_bytes', 'schema_text', 'validate_artifact', 'validation_tag',),
    '.names': ('join_path', 'qualname',),
    '.model': ('SCHEMA_VERSION', 'SUPPORTED_SCHEMA_VERSIONS', 'GraphArtifact', 'ModuleGraph', 'NodeData',),
    '.signature': ('SignatureMatcher', 'describe_mismatch', 'signature_key',),
}
__getattr__, __dir__ = _exports(__name__, globals(), _PARTS)

if TYPE_CHECKING:  # the same names, for type checkers
    from .codec import decode_value, encode_value
    from .format import (
        PORTABLE_FORMAT,
        artifact_from_bytes,
        parse_json,
        portable_digest,
        portable_from_bytes,
        portable_payload,
        portable_to_bytes,
        schema_text,
        validate_artifact,
        validation_tag,
    )
    from .names import join_path, qualname
    from .model import SCHEMA_VERSION, SUPPORTED_SCHEMA_VERSIONS, GraphArtifact, ModuleGraph, NodeData
    from .signature import SignatureMatcher, describe_mismatch, signature_key

__all__ = [
    "GraphArtifact",
    "ModuleGraph",
    "NodeData",
    "PORTABLE_FORMAT",
    "SCHEMA_VERSION",
    "SUPPORTED_SCHEMA_VERSIONS",
    "SignatureMatcher",
    "artifact_from_bytes",
    "decode_value",
    "describe_mismatch",
    "encode_value",
    "join_path",
    "parse_json",
    "portable_digest",
    "portable_from_bytes",
    "portable_payload",
    "portable_to_bytes",
    "qualname",
    "schema_text",
    "signature_key",
    "validate_artifact",
    "validation_tag",
]
