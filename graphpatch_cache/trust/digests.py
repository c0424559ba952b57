"""Validated digests: which artifact bytes a loader already validated, and under what.

A cache hit parses the same blob in every new process. Its JSON limits and JSON Schema pass
depend only on the bytes and on this release's schemas, so the store remembers, per user
(its local tier), the sha256 of bytes that passed, under :func:`validation_tag`, and
:func:`~graphpatch_cache.trust.validate.read_artifact` skips that pass for them. The record
names the digest of the exact bytes parsed, computed by the reader: different or tampered
bytes have another digest and are validated in full. The loader's own checks
(:func:`~graphpatch_cache.trust.validate.check_artifact`: allowlist, arguments, structure)
and binding's run every time.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

from ..artifact import validation_tag as format_tag
from .allowlist import ALLOWLIST_DIGEST


class ValidatedDigests(Protocol):
    """Where a loader remembers which bytes passed validation: the store's per-user local
    tier, never the shared root (anyone who can write that could fill it with records)."""

    def validated(self, digest: str, tag: str) -> bool: ...

    def mark_validated(self, digest: str, tag: str) -> None: ...


def validation_tag() -> str:
    """What a "validated" record is kept under besides the digest: the package version, the
    JSON Schemas and the allowlist this process reads. Any change makes old records stale."""
    return hashlib.sha256(f"{format_tag()} {ALLOWLIST_DIGEST}".encode()).hexdigest()


__all__ = ["ValidatedDigests", "validation_tag"]
