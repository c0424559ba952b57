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
from typing import Dict, Iterator, Optional

from ..errors import NewVariantWarning, OpaqueModuleWarning, SignatureMismatchError
from ..options import ON_DEMAND, ExtractionOptions

#: seconds the last extraction in this process took (None before the first)
_last_seconds: Optional[float] = None
#: extractions running in this thread's call stack (an opaque module's calls extract inside)
_depth = 0

_AVOID = ("pass inputs of a signature extracted before (same argument names and dtypes; a size of 1 where "
          "the model's code branches on it is a signature of its own), or build this signature ahead of time (`graphpatch-cache build MODEL --batch-size ... "
          "--seq-len ...`, or load_cached with such inputs once); ExtractionOptions(on_new_variant=\"extract\") "
          "silences this, \"error\" refuses such calls")


@contextmanager
def announced(options: ExtractionOptions) -> Iterator[bool]:
    """Around one extraction: say why it runs on demand (or refuse it), and time it. Yields
    whether it is the outermost extraction (the one a user's call started)."""
    global _last_seconds, _depth
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
    _depth += 1
    try:
        yield _depth == 1
    finally:
        _depth -= 1
        ON_DEMAND.reset(token)
    if _depth == 0:
        _last_seconds = time.perf_counter() - start


def report_opaque(failures: Dict[str, str], options: ExtractionOptions) -> None:
    """One warning naming the modules that could not be compiled (their ops are not nodes),
    unless each was warned about already (``warn_on_compilation_failure``)."""
    if not failures or options.warn_on_compilation_failure:
        return
    listed = "; ".join(f"{path or '<root>'}: {why}" for path, why in sorted(failures.items())[:5])
    more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
    warnings.warn(
        f"graphpatch_cache: {len(failures)} module{'s' if len(failures) != 1 else ''} could not be compiled and "
        f"{'stay' if len(failures) != 1 else 'stays'} opaque, so the ops inside {'them' if len(failures) != 1 else 'it'} "
        f"are not nodes: {listed}{more}. "
        "What still works: patching an opaque module's inputs, output, parameters and plain attributes, and "
        "everything outside it. To silence this, keep such modules opaque on purpose "
        "(ExtractionOptions(classes_to_skip_compiling=(TheClass,))) or filter OpaqueModuleWarning",
        OpaqueModuleWarning, stacklevel=3)


__all__ = ["announced", "report_opaque"]
