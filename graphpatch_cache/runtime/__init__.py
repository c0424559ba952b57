"""Runtime: bind artifacts to live models, node paths, patch application. Never traces."""

from .bind import ModuleGraphModule, bind
from .node_path import CodeText, NodePath
from .patchable_graph import PatchableGraph
from .shapes import ShapeDict, ShapeTuple, SymbolicShape, SymbolicSize

__all__ = ["CodeText", "ModuleGraphModule", "NodePath", "PatchableGraph", "ShapeDict", "ShapeTuple", "SymbolicShape",
           "SymbolicSize", "bind"]
