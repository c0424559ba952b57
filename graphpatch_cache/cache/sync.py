"""Copying entries between two roots (``graphpatch-cache sync SRC DST``): a directory and a
bucket, either way, or any two roots.

For each ref of the source (every key, or the keys asked for): a destination ref of the same
variant naming the same digest, whose blob is there, is skipped. Otherwise the source blob is
read and its sha256 verified (a blob that is missing or damaged is reported, never copied),
published on the destination (created if absent, rewritten only when what is there is
damaged), and then the ref is written: blob first, ref last, as ``put`` does. The ref's bytes
are copied as they are, after they parsed as a ref naming that digest. Nothing is imported
or run; the destination's readers apply the loader's checks as always. The source is only
read (no quarantine, no local tier).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

from .records import CacheEntry, Problem, parse_ref
from .store import CacheStore


@dataclass
class SyncReport:
    """What :func:`sync` did: ``key/variant`` strings copied and skipped, and what it could not copy."""

    copied: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)
    copied_bytes: int = 0


def _ref_bytes(src: CacheStore, entry: CacheEntry) -> Optional[bytes]:
    """The source ref's bytes, if they still parse as a ref naming ``entry``'s digest."""
    name = src._ref_name(entry.key, entry.variant)
    try:
        raw = src.backend.read(name)
        parsed = parse_ref(entry.key, entry.variant, src.location(name), json.loads(raw))
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    return raw if parsed is not None and parsed.digest == entry.digest else None


def sync(src: CacheStore, dst: CacheStore, keys: Optional[List[str]] = None, *, dry_run: bool = False,
         progress: Optional[Callable[[int, int], Any]] = None) -> SyncReport:
    """Copy every entry of ``src`` (of ``keys``: full keys) that ``dst`` lacks; see the module doc.

    :raises RemoteStoreError: either root cannot be reached.
    :raises OSError: the destination cannot be written.
    """
    report = SyncReport()
    todo = [entry for key in (src.keys() if keys is None else keys) for entry in src.variants(src._check_key(key))]
    for i, entry in enumerate(todo):
        label = f"{entry.key}/{entry.variant}"
        there = {e.variant: e for e in dst.variants(entry.key)}.get(entry.variant)
        if there is not None and there.digest == entry.digest and dst.backend.exists(dst._blob_name(entry.digest)):
            report.skipped.append(label)
        else:
            data, why = src._read_shared(entry.digest)
            ref = _ref_bytes(src, entry) if data is not None else None
            if data is None or ref is None:
                report.problems.append(Problem(path=src._blob_path(entry.digest) if data is None else entry.ref_path,
                                               key=entry.key, variant=entry.variant,
                                               kind="missing-blob" if why == "missing" else "corrupt-blob"
                                               if data is None else "malformed-ref",
                                               message=f"not copied: the blob is {why}" if data is None
                                               else "not copied: the ref changed while it was read"))
            else:
                if not dry_run:
                    dst._publish_blob(entry.digest, data)  # blob first, ref last
                    dst.backend.write(dst._ref_name(entry.key, entry.variant), ref)
                report.copied.append(label)
                report.copied_bytes += len(data)
        if progress is not None:
            progress(i + 1, len(todo))
    return report


__all__ = ["SyncReport", "sync"]
