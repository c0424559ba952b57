"""Where the cache lives by default (environment variables, platform dirs) and the units
``gc`` takes (durations, sizes)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

import platformdirs

#: a cache key, a blob's digest: a sha256 as 64 lowercase hex digits (the one pattern)
KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)


def is_key(value: object) -> bool:
    """Whether ``value`` is a full cache key (64 lowercase hex digits)."""
    return isinstance(value, str) and KEY_PATTERN.match(value) is not None


def default_root() -> Union[Path, str]:
    """``$GRAPHPATCH_CACHE_DIR`` (a directory, or a URL such as ``s3://bucket/prefix``), else
    the platform's user cache dir."""
    env = os.environ.get("GRAPHPATCH_CACHE_DIR")
    if env and "://" in env and not env.startswith("/"):
        return env  # a URL stays a string: Path() would fold its "//"
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("graphpatch-cache")) / "store"


def default_local_dir() -> Path:
    """``$GRAPHPATCH_CACHE_LOCAL_DIR``, else ``local`` in the platform's user cache dir."""
    env = os.environ.get("GRAPHPATCH_CACHE_LOCAL_DIR")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("graphpatch-cache")) / "local"


def parse_duration(value: Union[str, float, int]) -> float:
    """Seconds from ``30d``, ``12h``, ``90m``, ``45s``, ``2w``, or a Python number of seconds.

    A string needs its unit: ``"30"`` is refused (meant as days, it would have wiped the cache).
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. 30d, 12h, 90m, 2w)")
    if not match.group(2):
        n = match.group(1)
        raise ValueError(f"duration {value!r} has no unit: say {n}d (days), {n}h, {n}m, {n}s or {n}w")
    number, unit = float(match.group(1)), match.group(2).lower()
    return number * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]


def parse_size(value: Union[str, int]) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB``, ``1024`` ..."""
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 5GB, 500MB)")
    number, unit = float(match.group(1)), match.group(2).lower().rstrip("b").rstrip("i")
    return int(number * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[unit])


__all__ = ["KEY_PATTERN", "default_local_dir", "default_root", "is_key", "parse_duration", "parse_size"]
