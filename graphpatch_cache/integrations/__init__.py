"""Optional integrations, one small module each, detected at run time.

- :mod:`.kv_cache`: transformers' key/value caches as graph inputs and outputs.
- :mod:`.bitsandbytes`: 8-bit linear layers (leaf handling, stored dtypes, meta quantization).
- :mod:`.accelerate`: accelerate's hooks (device maps, offload).
- :mod:`.transformers`: building a transformers model from a config on the meta device
  (no weights), with 8-bit layers and device maps, for ``build``.

Each module imports its library only when a model uses it, and imports nothing of this
package above :mod:`graphpatch_cache.errors` and :mod:`graphpatch_cache._compat`
(:mod:`.transformers` uses :mod:`.bitsandbytes` for 8-bit layers on the meta device).
"""

from __future__ import annotations

__all__: list[str] = []
