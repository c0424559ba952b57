"""Graph artifacts written by hand (no extraction, no dynamo): ``x * factor`` for a
``(batch, width)`` float tensor ``x``, as a pure-data :class:`GraphArtifact`.

The fields are the ones extraction writes for ``forward(self, x): return x * factor`` (the
JSON format is fixed by ``cache_schema/``); ``dims`` and ``dtype`` change the signature, so two
of these with different ``dtype`` are two variants of one key."""

from __future__ import annotations

import json

from graphpatch_cache.artifact import GraphArtifact, ModuleGraph, NodeData

__all__ = ["scaling_artifact"]

_SPEC = json.dumps([1, {"type": "builtins.tuple", "context": "null", "children_spec": [
    {"type": "builtins.tuple", "context": "null", "children_spec": []},
    {"type": "builtins.dict", "context": json.dumps(["x"]), "children_spec": [
        {"type": None, "context": None, "children_spec": []}]}]}])


def scaling_artifact(factor: int = 2, *, dtype: str = "float32", model_class: str = "hand_built.Scale") -> GraphArtifact:
    shape = ["s0", "s1"]
    meta = {"shape": shape, "dtype": dtype}
    nodes = [
        NodeData(name="x", op="placeholder", target="x", args={"t": []}, kwargs={"d": []}, meta={**meta, "input": ["x"]}),
        NodeData(name="mul", op="call_function", target="_operator.mul", args={"t": [{"n": "x"}, factor]},
                 kwargs={"d": []}, meta=dict(meta)),
        NodeData(name="output", op="output", target="output", args={"t": [{"n": "mul"}]}, kwargs={"d": []},
                 meta=dict(meta)),
    ]
    root = ModuleGraph(name="", module_path="", module_class=model_class, kind="compiled", call_index=0, nodes=nodes,
                       children=[], code=f"\n\n\ndef forward(self, x):\n    mul = x * {factor};  x = None\n    return mul\n    ")
    options = {"error_on_compilation_failure": False, "warn_on_compilation_failure": False, "skip_compilation": False,
               "classes_to_skip_compiling": [], "allow_unused_submodules": True, "custom_extraction_functions": [],
               "postprocessing_function": None}
    extraction = {"options": options, "devices": [], "training": False, "opaque": {}, "shape_specialized": {},
                  "data_dependent": {}, "structure": {"modules": [["", model_class]], "tensors": []}, "sources": {}}
    signature = {"spec": _SPEC, "leaves": [{"kind": "tensor", "dtype": dtype, "device": "cpu", "dims": ["dyn", "dyn"]}]}
    return GraphArtifact(schema_version=1, model_class=model_class, root=root, signature=signature, input_spec=_SPEC,
                         extraction=extraction, versions={"graphpatch_cache": "0", "python": "3", "torch": "2"})
