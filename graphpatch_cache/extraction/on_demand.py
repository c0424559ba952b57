"""Extractions nobody asked for: a call that fits none of the graphs extracted so far.

Such a call extracts a new graph variant, which takes seconds to minutes, in the middle of
someone's analysis loop. Before it starts, the runtime's reason (which input differs from every
variant, old and new, in :data:`~graphpatch_cache.options.ON_DEMAND`) is said once, with how
long the last extraction in this process took and how to avoid it; or, with
``ExtractionOptions(on_new_variant="error")``, the call is refused.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional

from ..errors import NewVariantWarning, SignatureMismatchError
from ..options import ON_DEMAND, ExtractionOptions

#: seconds the last extraction in this process took (None before the first)
_last_seconds: Optional[float] = None

_AVOID = ("pass inputs of a signature extracted before (same argument names, dtypes, and sizes of 1 vs "
          "larger), or build this signature ahead of time (`graphpatch-cache build MODEL --batch-size ... "
          "--seq-len ...`, or load_cached with such inputs once); ExtractionOptions(on_new_variant=\"extract\") "
          "silences this, \"error\" refuses such calls")


@contextmanager
def announced(options: ExtractionOptions) -> Iterator[None]:
    """Around one extraction: say why it runs on demand (or refuse it), and time it."""
    global _last_seconds
    reason = ON_DEMAND.get()
    if reason is not None and options.on_new_variant == "error":
        raise SignatureMismatchError(
            f"this call fits none of the graphs extracted so far ({reason}), and on_new_variant='error' "
            "refuses to extract a new one", hint=_AVOID)
    if reason is not None and options.on_new_variant == "warn":
        took = "" if _last_seconds is None else f"; the last extraction in this process took {_last_seconds:.1f} s"
        warnings.warn(f"graphpatch_cache: extracting a new graph variant for this call ({reason}){took}. "
                      f"To avoid it: {_AVOID}", NewVariantWarning, stacklevel=2)
    start = time.perf_counter()
    token = ON_DEMAND.set(None)  # what this extraction runs (child graphs, opaque routers) is part of it
    try:
        yield
    finally:
        ON_DEMAND.reset(token)
    _last_seconds = time.perf_counter() - start


__all__ = ["announced"]
