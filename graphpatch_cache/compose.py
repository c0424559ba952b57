"""The composition: ``PatchableGraph = bind(extract(model, inputs), model)``.

The one module that knows both sides of the seam. :mod:`.extraction` turns a model and a
call into a :class:`~graphpatch_cache.artifact.GraphArtifact`; :mod:`.runtime` binds an
artifact to the live model. Neither imports the other; this module plugs extraction into
the runtime's graph, and :mod:`.cache` plugs a memoized extractor into the same class.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from .artifact import GraphArtifact
from .extraction import extract
from .options import ExtractionOptions
from .runtime import patchable_graph as _runtime


def default_extractor(model: torch.nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                      options: ExtractionOptions) -> GraphArtifact:
    """Extract without a cache (:func:`graphpatch_cache.extraction.extract`)."""
    return extract(model, args, kwargs, options)


class PatchableGraph(_runtime.PatchableGraph):
    __doc__ = _runtime.PatchableGraph.__doc__

    @classmethod
    def _default_extractor(cls) -> _runtime.Extractor:
        return default_extractor


__all__ = ["PatchableGraph", "default_extractor", "extract"]
