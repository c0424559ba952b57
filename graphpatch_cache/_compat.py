"""Version differences and the few private torch entry points we rely on, in one place.

Each helper says which torch version needs it and why. Everything here is feature-checked
at import time so an incompatible torch fails with a clear message, not deep in a trace.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.fx
import torch.utils._pytree as pytree

# torch >= 2.3: fx's public decorator that keeps an impure function out of dead-code
# elimination. Our extraction markers carry no data dependency the graph would keep alive.
if not hasattr(torch.fx.node, "has_side_effect"):  # pragma: no cover - old torch
    raise ImportError("graphpatch_cache needs torch.fx.node.has_side_effect (torch >= 2.3)")
has_side_effect = torch.fx.node.has_side_effect

# torch >= 2.3: pytree spec (de)serialization. Only classes registered with a
# serialized_type_name (tuples, lists, dicts, transformers' ModelOutput, ...) round-trip;
# loading never imports or constructs anything else.
treespec_dumps = pytree.treespec_dumps
treespec_loads = pytree.treespec_loads
tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten
tree_flatten_with_path = pytree.tree_flatten_with_path


def is_compiling() -> bool:
    """True while dynamo traces (torch >= 2.3 exposes torch.compiler.is_compiling)."""
    return torch.compiler.is_compiling()


@contextlib.contextmanager
def dynamo_capture_config() -> Iterator[None]:
    """Dynamo settings for extraction (torch 2.13).

    - specialize_float: since torch 2.6 dynamo lifts Python float attributes (LayerNorm eps,
      attention scaling, math.pi) as graph inputs; we bake them as constants instead, the way
      the module would compute them.
    - use_duck_shape (torch.fx.experimental._config, torch >= 2.1): off, see below.
    """
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    # use_duck_shape: dynamo gives equal example sizes one symbol ("duck sizing"), so a graph
    # traced at batch == seq silently assumes they stay equal. We want one symbol per size.
    with torch._dynamo.config.patch(specialize_float=True, specialize_int=True), fx_config.patch(use_duck_shape=False):
        yield


@contextlib.contextmanager
def pretend_compiling() -> Iterator[None]:
    """Make ``torch.compiler.is_compiling()`` answer True during an eager call.

    Why: extraction records each module call's input and output structure in one eager call
    and traces the same call with dynamo. Libraries take other paths while compiling
    (transformers 5 materializes the attention mask that eager sdpa leaves as None), so the
    eager recording must see the same answer as the trace. torch 2.13 keeps the answer in the
    module global ``torch.compiler._is_compiling_flag``; we set it for the recording only.
    """
    import torch.compiler as tc

    if not hasattr(tc, "_is_compiling_flag"):  # pragma: no cover - other torch versions
        raise RuntimeError("this torch version has no torch.compiler._is_compiling_flag; "
                           "graphpatch_cache needs torch 2.6-2.13 semantics here")
    previous = tc._is_compiling_flag
    tc._is_compiling_flag = True
    try:
        yield
    finally:
        tc._is_compiling_flag = previous


def reset_dynamo() -> None:
    """Drop dynamo's caches so the next capture traces afresh (public since torch 2.2)."""
    torch.compiler.reset()


def fake_value(node: torch.fx.Node) -> Any:
    """The example (fake) value dynamo recorded for a node; None when absent."""
    return node.meta.get("example_value", node.meta.get("val"))


__all__ = [
    "dynamo_capture_config",
    "fake_value",
    "has_side_effect",
    "is_compiling",
    "pretend_compiling",
    "reset_dynamo",
    "tree_flatten",
    "tree_flatten_with_path",
    "tree_unflatten",
    "treespec_dumps",
    "treespec_loads",
]
