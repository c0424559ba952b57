"""Source checks find module digests without importing (oracle: marker files written by planted
packages); the rest of the cache's trust rules are in tests/integration/test_cache_trust.py."""

from __future__ import annotations

import hashlib
import sys


from graphpatch_cache.live.sources import current_module_digest


# ------------------------------------------------------------------------------------------------
# helpers


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------
# point 6: nothing named by an artifact is imported




def test_module_digests_are_found_without_importing(planted_package):
    name, marker, folder = planted_package
    assert current_module_digest(name) == sha256((folder / "__init__.py").read_bytes())
    assert current_module_digest(f"{name}.sub") == sha256((folder / "sub" / "__init__.py").read_bytes())
    assert current_module_digest(f"{name}.sub.mod") == sha256((folder / "sub" / "mod.py").read_bytes())
    for unlocatable in (f"{name}.missing", f"{name}.__init__", f"{name}..sub", f"{name}.sub.mod.x", "",
                        f"{name}.class", "os.system", "a" * 600, f"{name}/sub"):
        assert current_module_digest(unlocatable) is None, unlocatable
    assert current_module_digest("json.decoder") is not None  # imported stdlib modules still work
    assert not marker.exists() and name not in sys.modules
