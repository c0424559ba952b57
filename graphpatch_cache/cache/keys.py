"""Cache keys: a digest of everything that determines the extracted graphs, nothing more.

What goes in (DESIGN.md, "The artifact and the cache"):

- the environment: schema and package versions; Python, torch and transformers versions;
  accelerate and bitsandbytes versions when the model uses them;
- the model's structure: class, training flag, config (without machine-specific fields such
  as local paths), every module's path and type (8-bit replacements change the structure),
  every parameter's and buffer's name, shape and dtype and which names are tied (never
  values), and a digest of the source files of every module class involved;
- the example inputs' signature: structure, per tensor dtype, rank and whether each size is
  0 or larger (sizes of 1 and more share a key: one key holds the graph variants of a size 1
  and of larger sizes, whether one graph serves both or not); Python constants by value. Not the device:
  a graph built on a CPU box (or on the meta device) serves a GPU model;
- the extraction options.

Two teammates with the same model on different paths, with different weights, in different
working directories or cache locations, get the same key.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import marshal
import os
from typing import Any, Dict, Optional, Set, Tuple, Union

import torch

from .. import _compat
from ..artifact.signature import constant_value
from ..live.environment import environment_fingerprint
from ..live.inputs import CallInputs, Inputs, flat_inputs
from ..live.sources import module_file_digest
from ..live.structure import module_list, tensor_list
from ..options import ExtractionOptions
from ..artifact.names import qualname

#: config fields that describe the machine or the download, not the model's structure, and
#: fields the tensors already say better (the dtype a config was saved with vs loaded in)
_MACHINE_CONFIG_FIELDS = frozenset(
    {"_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "_attn_implementation_autoset",
     "architectures", "dtype", "torch_dtype"}
)

#: how the input fingerprint writes a size of 1 or more. Releases before graphs could serve
#: size 1 wrote 1 apart and "n" for larger sizes; the new token gives every key anew, so that
#: no older release reads (and refuses) the "dyn1" signatures stored under it
SIZE_CLASS = "n1"


def _code_digest(cls: type) -> str:
    """For a class with no source file (a notebook cell, exec'd code): a digest of its
    functions' bytecode and constants."""
    h = hashlib.sha256(qualname(cls).encode())
    for name, value in sorted(vars(cls).items()):
        code = getattr(value, "__code__", None)
        if code is not None:
            h.update(name.encode())
            h.update(marshal.dumps(code.replace(co_filename="", co_firstlineno=1)))
    return "code:" + h.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return repr(value)  # "nan", "inf", "-inf": key material stays strict JSON (refs, portable files)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _experts_implementations(config: Any) -> Dict[str, str]:
    """transformers' ``experts_implementation`` of the config and its sub-configs, where not
    "eager" (what models without Mixture-of-Experts layers get): a private field that
    ``to_dict`` leaves out, and it decides what a MoE layer's graph computes."""
    found: Dict[str, str] = {}
    for key, sub in [("", config)] + [(k, getattr(config, k, None)) for k in getattr(config, "sub_configs", {}) or {}]:
        value = getattr(sub, "_experts_implementation", None)
        if isinstance(value, str) and value != "eager":
            found[key] = value
    return found


def config_fingerprint(model: torch.nn.Module) -> Optional[Dict[str, Any]]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    data = {k: v for k, v in config.to_dict().items() if k not in _MACHINE_CONFIG_FIELDS}
    data["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    experts = _experts_implementations(config)
    if experts:  # absent for models without experts ("eager"): their keys stay as they were
        data["_experts_implementation"] = experts
    fingerprint: Dict[str, Any] = _jsonable(data)
    return fingerprint


def structure_fingerprint(model: torch.nn.Module) -> Dict[str, Any]:
    """The model's structure: modules, tensor names/shapes/dtypes/ties, sources, config."""
    modules = module_list(model)
    tensors = tensor_list(model)
    files = set()
    code_digests: Set[str] = set()
    classes: Dict[type, None] = {}  # (each class once: a 32-layer model repeats a few hundred times)
    for m in model.modules():
        for cls in type(m).__mro__:
            if cls in (torch.nn.Module, object):
                break
            classes[cls] = None
    for cls in classes:
        try:
            path = inspect.getsourcefile(cls)
        except (TypeError, OSError):
            path = None
        if path and os.path.exists(path):
            files.add(path)
        else:
            code_digests.add(_code_digest(cls))
    sources = sorted({module_file_digest(p) or "unreadable:" + p for p in files} | code_digests)
    return {
        "model_class": qualname(type(model)),
        "training": bool(model.training),
        "config": config_fingerprint(model),
        "modules": modules,
        "tensors": tensors,
        "sources": sources,
    }


def input_fingerprint(inputs: Union[Inputs, CallInputs]) -> Dict[str, Any]:
    """The example inputs' shape class: a size of 0 is distinct, sizes of 1 and more are not
    (:data:`SIZE_CLASS`).

    :param inputs: canonical inputs, or the :class:`~graphpatch_cache.live.inputs.CallInputs` of a call.
    """
    leaves, spec = (inputs.leaves, inputs.spec) if isinstance(inputs, CallInputs) else flat_inputs(inputs)
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            dims = [0 if s == 0 else SIZE_CLASS for s in leaf.shape]
            out.append(["tensor", str(leaf.dtype), dims])
        else:
            out.append(["const", constant_value(leaf)])
    return {"spec": _compat.treespec_dumps(spec), "leaves": out}


def key_material(
    model: torch.nn.Module,
    args: Tuple[Any, ...] = (),
    kwargs: Optional[Dict[str, Any]] = None,
    options: Optional[ExtractionOptions] = None,
    environment: Optional[Dict[str, Any]] = None,
    *,
    inputs: Optional[CallInputs] = None,
) -> Dict[str, Any]:
    """Everything the key is a digest of (useful to see why two keys differ).

    :param inputs: the call's :class:`~graphpatch_cache.live.inputs.CallInputs`, when the
        caller has them (then ``args``/``kwargs`` are not read).
    """
    if inputs is None:
        inputs = CallInputs.of(model, tuple(args), dict(kwargs or {}))
    return {
        "environment": environment if environment is not None else environment_fingerprint(model),
        "model": structure_fingerprint(model),
        "inputs": input_fingerprint(inputs),
        "options": (options or ExtractionOptions()).fingerprint(),
    }


def digest_of(material: Dict[str, Any]) -> str:
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(
    model: torch.nn.Module,
    *example_args: Any,
    options: Optional[ExtractionOptions] = None,
    environment: Optional[Dict[str, Any]] = None,
    **example_kwargs: Any,
) -> str:
    """The cache key for ``model`` called with these example inputs, without building anything.

    :param environment: override the environment fingerprint (see
        :func:`environment_fingerprint`), e.g. to see the key another torch version would use.
    """
    return digest_of(key_material(model, example_args, example_kwargs, options, environment))


__all__ = ["SIZE_CLASS", "cache_key", "config_fingerprint", "environment_fingerprint", "input_fingerprint", "key_material", "structure_fingerprint"]
