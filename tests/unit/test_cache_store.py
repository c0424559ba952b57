"""CacheStore's options without a cache entry: size and duration parsing, a local tier inside the
root refused (entries: tests/unit/test_cache_store_files.py and tests/integration/test_cache_store*.py)."""

from __future__ import annotations


import pytest

from graphpatch_cache.cache import CacheStore
from graphpatch_cache.cache.store import parse_duration, parse_size
from graphpatch_cache.errors import CacheError


@pytest.mark.parametrize("where", ["inside", "same"])
def test_local_dir_inside_root_is_refused(tmp_path, where):
    root = tmp_path / "root"
    local = root / "local" if where == "inside" else root
    with pytest.raises(CacheError) as info:
        CacheStore(root, local_dir=local)
    assert str(local) in str(info.value)
    assert not root.exists()


def test_parse_duration_and_size():
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("90m") == 90 * 60
    assert parse_duration("45s") == 45
    assert parse_duration("2w") == 14 * 86400
    assert parse_duration("1.5h") == 5400
    assert parse_duration(5) == 5.0
    for bad in ("", "d", "-1d", "3y", "1 day"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    # a string without a unit is refused (``gc --older-than 30`` once meant 30 seconds)
    for bare in ("30", "0", "1.5"):
        with pytest.raises(ValueError, match="no unit") as err:
            parse_duration(bare)
        assert f"{bare}d" in str(err.value)
    assert parse_size("1024") == 1024
    assert parse_size(1024) == 1024
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("500MiB") == 500 * 1024**2
    assert parse_size("10k") == 10 * 1024
    assert parse_size("1.5KiB") == 1536
    assert parse_size("5GB") in (5 * 10**9, 5 * 1024**3)
    assert parse_size("500MB") in (500 * 10**6, 500 * 1024**2)
    assert parse_size("1TB") in (10**12, 1024**4)
    for bad in ("", "GB", "-1GB", "5 XB", "five"):
        with pytest.raises(ValueError):
            parse_size(bad)
