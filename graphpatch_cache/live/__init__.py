"""The live side: facts read from a live model and a live call, as data.

- :mod:`.inputs`: a call's canonical inputs, their flat leaves and concrete signature.
- :mod:`.structure`: the model's module and tensor lists (what binding and keys compare).
- :mod:`.sources`: digests of the source files a model's code was traced from.

Extraction, the runtime and the cache all read the live model through these modules, so the
three see the same facts.
"""

from __future__ import annotations

__all__: list[str] = []
