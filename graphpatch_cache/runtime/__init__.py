"""Runtime: bind artifacts to live models, node paths, patch application. Never traces.

- :mod:`.patchable_graph`: the user-facing graph (variants per call signature, calling,
  ``pg.patch``), with :mod:`.patch_stack` (variants, patch maps, moving patches between
  variants), :mod:`.generate` (greedy generation through the graph) and :mod:`.files`
  (``pg.save``/``PatchableGraph.load``);
- :mod:`.bind` (artifact + model -> GraphModules) with :mod:`.routing` (accelerate hooks
  around graphs, the router of an opaque parent's child calls) and :mod:`.guards` (no write
  into a parameter, global state preserved);
- :mod:`.node_path`, :mod:`.shapes` (what users type and see), :mod:`.patching` (patch slots).
"""

from __future__ import annotations

from .bind import ModuleGraphModule, bind
from .node_path import CodeText, NodePath
from .patchable_graph import PatchableGraph
from .shapes import ShapeDict, ShapeTuple, SymbolicShape, SymbolicSize

__all__ = ["CodeText", "ModuleGraphModule", "NodePath", "PatchableGraph", "ShapeDict", "ShapeTuple", "SymbolicShape",
           "SymbolicSize", "bind"]
