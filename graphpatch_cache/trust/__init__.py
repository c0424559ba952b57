"""The trust boundary: what a stored graph may call, and the loader's checks.

- :mod:`.allowlist`: the closed list of call targets (exact names, a reviewed data file).
- :mod:`.functions`: this library's own graph functions, registered in the allowlist.
- :mod:`.validate`: the loader's doors (``read_artifact``, ``read_portable``) and the
  structural checks of an artifact before anything binds or runs, built from
  :mod:`.values` (encoded argument values, specs, signatures), :mod:`.rules` (argument
  rules of particular targets), :mod:`.op_schemas` (does a call fit its operator's
  signature) and :mod:`.writes` (what a node writes into or may alias; binding's guards
  use the same rules).

Extraction uses the same rules when it writes an artifact, so what extraction writes is
exactly what the loader accepts.
"""

from __future__ import annotations

__all__: list[str] = []
