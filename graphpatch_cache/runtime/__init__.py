"""Runtime: bind artifacts to live models, node paths, patch application. Never traces."""

from .bind import ModuleGraphModule, bind
from .node_path import NodePath
from .patchable_graph import PatchableGraph

__all__ = ["ModuleGraphModule", "NodePath", "PatchableGraph", "bind"]
