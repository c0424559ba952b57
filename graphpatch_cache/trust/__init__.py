"""The trust boundary: what a stored graph may call, and the loader's checks.

- :mod:`.allowlist`: the closed list of call targets (exact names, a reviewed data file).
- :mod:`.functions`: this library's own graph functions, registered in the allowlist.
- :mod:`.validate`: structural validation of an artifact before anything binds or runs.

Extraction uses the same rules when it writes an artifact, so what extraction writes is
exactly what the loader accepts.
"""

from __future__ import annotations

__all__: list[str] = []
