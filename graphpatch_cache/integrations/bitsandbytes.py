"""bitsandbytes 8-bit linears, detected at run time: leaf graphs, stored dtypes, patchable
views of int8 weights, and 8-bit layers on the meta device. Nothing here imports
bitsandbytes unless the model uses it.

A *leaf handler* describes a module class that extraction never traces into: dynamo's graph
of a bitsandbytes ``Linear8bitLt`` holds local functions and in-place state updates that
cannot be stored as data. The handler gives the module a small graph of its own (input,
the quantized weight bound by identity, bias, one call) and output shapes computed from the
input's (symbolic) shape, so the graphs around it stay shape-generic.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, cast

import torch

from ..errors import GraphPatchCacheError

#: bitsandbytes' notice on every 8-bit matmul of a non-float16 input: logged (not a Python
#: warning) by ``bitsandbytes.autograd._functions`` once per layer per call, 14 lines per call
#: of a 2-layer Llama on CPU. The exact logger, level and message template we quiet.
_CAST_LOGGER = "bitsandbytes.autograd._functions"
_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast from %s to float16 during quantization"


@dataclass(frozen=True)
class LeafHandler:
    #: fake outputs (a list of tensors) from the module and its fake tensor inputs
    fake_outputs: Callable[[torch.nn.Module, List[torch.Tensor]], List[torch.Tensor]]
    #: the name of the registered graph function the leaf graph calls:
    #: fn(module_ref, x, weight, bias) (a name, resolved through the allowlist)
    call: str


def _linear_fake(module: torch.nn.Module, xs: List[torch.Tensor]) -> List[torch.Tensor]:
    x = xs[0]
    out_features: int = module.out_features  # type: ignore[assignment]  # (an int attribute of Linear8bitLt)
    return [x.new_empty((*x.shape[:-1], out_features))]


class _QuietOurCalls(logging.Filter):
    """Drops bitsandbytes' per-call cast notice (:data:`_CAST_MESSAGE`) logged while this
    thread runs an 8-bit layer for a graph (:func:`run_8bit`), after the first one in the
    process: the cast is worth saying once, not 7 times per layer per call. Records from the
    user's own calls of the model (any thread), and every other record, pass untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(_IN_OUR_CALL, "on", False) or record.msg != _CAST_MESSAGE or record.levelno != logging.WARNING:
            return True
        if not self.shown:
            self.shown = True
            return True
        return False


_IN_OUR_CALL = threading.local()
_QUIET = _QuietOurCalls()
_INSTALLED: List[logging.Logger] = []
_INSTALL_LOCK = threading.Lock()


def _install_quiet_filter() -> None:
    # A filter on bitsandbytes' own logger, added once: it only acts on records made inside
    # run_8bit in the same thread, so the logger behaves as before for everyone else. (Not
    # warnings.catch_warnings: the notice is a log record, and catch_warnings swaps the
    # process-wide warnings.filters on every enter and exit, which is not thread-safe.)
    with _INSTALL_LOCK:
        if not _INSTALLED:
            logger = logging.getLogger(_CAST_LOGGER)
            logger.addFilter(_QUIET)
            _INSTALLED.append(logger)


@contextlib.contextmanager
def quiet_casts() -> Iterator[None]:
    """While a graph runs 8-bit layers in this thread (its own leaf call, or an opaque module
    holding such layers): bitsandbytes' per-call cast notice shown once per process instead
    of once per layer per call (see :class:`_QuietOurCalls`); the user's direct calls of the
    model log it as they always did."""
    if not _INSTALLED:
        _install_quiet_filter()
    state = _IN_OUR_CALL
    outer = getattr(state, "on", False)
    state.on = True
    try:
        yield
    finally:
        state.on = outer


def run_8bit(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for an 8-bit linear that a graph calls (see :func:`quiet_casts`)."""
    with quiet_casts():
        return cast(torch.Tensor, module(x))


def quiet_casts_if_loaded() -> ContextManager[None]:
    """:func:`quiet_casts` where bitsandbytes is imported (only then can a module hold its
    layers), else nothing: for an opaque module's call, which may hold 8-bit layers."""
    return quiet_casts() if "bitsandbytes" in sys.modules else contextlib.nullcontext()


def leaf_handler(module: torch.nn.Module) -> Optional[LeafHandler]:
    """The handler for ``module``'s class, if it is one extraction keeps as a leaf."""
    bnb = sys.modules.get("bitsandbytes")  # only models built with it can hold its layers
    if bnb is None or not hasattr(bnb, "nn"):
        return None

    if isinstance(module, bnb.nn.Linear8bitLt):
        return LeafHandler(fake_outputs=_linear_fake, call="graphpatch_cache.functions.linear_8bit")
    return None


#: id(int8 weight) -> its module (bitsandbytes moves the row scales to ``module.state.SCB``
#: once the layer has run, so the weight alone cannot be dequantized)
_OWNERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()


def register_quantized_owner(module: torch.nn.Module) -> None:
    weight = getattr(module, "weight", None)
    if weight is not None and type(weight).__name__ == "Int8Params":
        _OWNERS[id(weight)] = module


def _row_scales(value: Any) -> Any:
    scales = getattr(value, "SCB", None)
    if scales is None:
        owner = _OWNERS.get(id(value))
        if owner is not None and getattr(owner, "weight", None) is value:
            scales = getattr(getattr(owner, "state", None), "SCB", None)
    return scales


def stored_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a parameter has once loaded: an 8-bit weight built on the meta device is
    still float until bitsandbytes quantizes it, but is int8 in every loaded model."""
    if type(tensor).__name__ == "Int8Params":
        return torch.int8
    return tensor.dtype


def is_quantized_weight(value: Any) -> bool:
    return type(value).__name__ == "Int8Params" and value.dtype == torch.int8 and _row_scales(value) is not None


def patch_view(value: Any) -> Any:
    """What patches see for a value: an 8-bit weight is shown dequantized (float32)."""
    if is_quantized_weight(value):
        import bitsandbytes.functional as F  # optional dependency: imported only for an 8-bit weight

        return F.int8_vectorwise_dequant(value.data, _row_scales(value))
    return value


def quantize_8bit_on_meta(model: torch.nn.Module) -> torch.nn.Module:
    """Swap linears for bitsandbytes 8-bit ones on a meta model, as
    ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_8bit=True))`` does."""
    try:  # optional dependencies, imported only when 8-bit is asked for
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    except ImportError as exc:
        raise GraphPatchCacheError("8-bit needs bitsandbytes (>= 0.46 runs on CPU)",
                                   hint="pip install bitsandbytes") from exc
    config = BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    skip = ["lm_head"] + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    params = inspect.signature(replace_with_bnb_linear).parameters
    kwargs: Dict[str, Any] = {"modules_to_not_convert": skip, "quantization_config": config}
    if "pre_quantized" in params:
        kwargs["pre_quantized"] = False
    model = replace_with_bnb_linear(model, **{k: v for k, v in kwargs.items() if k in params})
    model_config: Any = model.config
    model_config.quantization_config = config
    return model


__all__ = ["LeafHandler", "is_quantized_weight", "leaf_handler", "patch_view", "quantize_8bit_on_meta",
           "register_quantized_owner", "run_8bit", "stored_dtype"]
