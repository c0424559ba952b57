"""transformers model building: a model from its config alone, on the meta device (no
weight memory), laid out as ``from_pretrained`` would; and the ``device_map`` check.

transformers and accelerate are optional dependencies: they are imported inside the
functions that need them, when a build asks for a model (importing this module costs
nothing of them).
"""

from __future__ import annotations

import linecache
import re
import sys
from typing import Any, Dict, Optional

import torch

from ..errors import BuildError, GraphPatchCacheError, close_matches
from . import bitsandbytes


#: Branches of transformers' code on a size being 1 whose path for larger sizes computes the
#: same values at size 1, reviewed by hand: (module, function, the branch's line, the one line
#: it runs). A graph that took such a branch for a larger size serves size 1 too (extraction's
#: size check ignores the guard ``Ne(size, 1)`` it leaves, at size 1 only). Matched against
#: the installed source text of both lines, so any change there ends the exception.
SIZE_ONE_NEUTRAL = (
    # position ids of one row expanded to the batch (no mask, no cache): at batch 1,
    # ``expand(1, -1)`` of a one-row tensor is the same values
    ("transformers.masking_utils", "_preprocess_mask_arguments",
     "if batch_size != position_ids.shape[0]:", "position_ids = position_ids.expand(batch_size, -1)"),
)

_WHERE = re.compile(r"^(.*)  # (.+):(\d+) in (\w+)$")


def size_one_neutral(where: Optional[str]) -> bool:
    """Whether a guard's source line (torch's ``"<line>  # <file>:<n> in <function>"``) is a
    branch of :data:`SIZE_ONE_NEUTRAL`, both lines read again from the module's file."""
    found = _WHERE.match(where or "")
    if found is None:
        return False
    line, file, number, function = found.groups()
    for module, name, branch, body in SIZE_ONE_NEUTRAL:
        path = getattr(sys.modules.get(module), "__file__", None)
        if (function != name or line.strip() != branch or path is None
                or not file.replace("\\", "/").endswith(module.replace(".", "/") + ".py")):
            continue
        if (linecache.getline(path, int(number)).strip() == branch
                and linecache.getline(path, int(number) + 1).strip() == body):
            return True
    return False


def _model_class(config: Any, model_class: Any) -> Any:
    import transformers  # optional dependency, deferred (see the module docstring)

    if model_class is not None:
        if isinstance(model_class, str):
            found = getattr(transformers, model_class, None)
            if found is None:
                raise BuildError(f"transformers has no model class {model_class!r}",
                                 hint="pass the class itself, or a name such as 'LlamaForCausalLM'")
            return found
        return model_class
    for name in getattr(config, "architectures", None) or []:
        found = getattr(transformers, name, None)
        if found is not None:
            return found
    try:
        transformers.AutoModelForCausalLM._model_mapping[type(config)]
        return transformers.AutoModelForCausalLM
    except KeyError:
        return transformers.AutoModel


def meta_model(
    config: Any,
    *,
    model_class: Any = None,
    dtype: Optional[torch.dtype] = None,
    quantization: Optional[str] = None,
    attn_implementation: Optional[str] = None,
) -> torch.nn.Module:
    """Instantiate the model for ``config`` on the meta device (no weight memory), as
    ``from_pretrained`` would lay it out: same class, dtype, attention, tied weights."""
    try:  # optional dependencies, deferred (see the module docstring)
        import transformers
        from accelerate import init_empty_weights
    except ImportError as exc:
        raise BuildError("build() needs transformers and accelerate",
                         hint="pip install 'graphpatch-cache[transformers]'") from exc
    if not isinstance(config, transformers.PretrainedConfig):
        raise BuildError(f"build() takes a transformers config or model class, got {type(config).__name__}",
                         hint="e.g. build(LlamaConfig(...)) or build('path/to/dir/with/config.json') in the CLI")
    if quantization not in (None, "8bit"):
        raise BuildError(f"unknown quantization {quantization!r}", hint="use quantization='8bit' or None")
    cls = _model_class(config, model_class)
    kwargs: Dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with init_empty_weights(include_buffers=False):
            if hasattr(cls, "from_config"):
                model = cls.from_config(config, **kwargs)
            else:
                model = cls._from_config(config, **kwargs)
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildError(
            f"transformers cannot build a model for {type(config).__name__} ({exc})".splitlines()[0],
            hint="pass model_class= (a transformers model class for this config), or register the config "
            "with the transformers Auto classes",
        ) from exc
    if quantization == "8bit":
        try:
            model = bitsandbytes.quantize_8bit_on_meta(model)
        except GraphPatchCacheError as exc:
            raise BuildError(exc.message, hint=exc.hint) from exc
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    built: torch.nn.Module = model.eval()
    return built


#: device_map values that name a placement strategy rather than devices
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(model: torch.nn.Module, device_map: Any) -> None:
    """Check a ``device_map`` (as ``from_pretrained`` takes it) against ``model``: every key
    names a module or tensor of the model ("" for all of it), every value is a device (an
    index, ``"cpu"``, ``"cuda:1"``, ``"disk"``, ...), and every parameter is placed.

    :raises BuildError: naming the first problem (unknown names come with close matches).
    """
    if device_map is None or (isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES):
        return
    if not isinstance(device_map, dict):
        device_map = {"": device_map}
    modules = {name for name, _ in model.named_modules()}
    tensors = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    for key, device in device_map.items():
        if not isinstance(key, str) or (key and key not in modules and key not in tensors):
            matches = close_matches(str(key), sorted(modules | tensors))
            raise BuildError(
                f"device_map names {key!r}, which is not a module or tensor of {type(model).__name__}",
                hint=("close matches: " + ", ".join(matches)) if matches
                else "keys are module names as in model.named_modules(), e.g. 'model.layers.0'",
            )
        if device == "disk" or (isinstance(device, int) and not isinstance(device, bool) and device >= 0):
            continue
        try:
            torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise BuildError(f"device_map puts {key or 'the model'!r} on {device!r}, which is not a device",
                             hint="use a GPU index (0), 'cpu', 'disk', or a device string such as 'cuda:1'") from None
    placed = sorted(device_map, key=len)
    for name in sorted({name for name, _ in model.named_parameters()}):
        if not any(k == "" or name == k or name.startswith(k + ".") for k in placed):
            owner = name.rpartition(".")[0]
            raise BuildError(f"device_map places no device for {name!r}",
                             hint=f"add {owner or name!r} (or a module above it) to the device_map")


__all__ = ["DEVICE_MAP_STRATEGIES", "check_device_map", "meta_model"]
