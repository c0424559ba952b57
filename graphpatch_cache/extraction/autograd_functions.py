"""Custom ``torch.autograd.Function`` calls: their forward inlined, their gradient refused.

Dynamo writes ``Function.apply(x)`` as one ``autograd_function_apply(fwd_body, bwd_body, *x)``
node whose two bodies are fx graphs on the traced module. The node cannot be stored as
data (it runs graphs handed to it), and nothing an artifact names may run code of the
model's choosing. So the forward body's ops are copied into the flat graph in place of the
call (they become ordinary, patchable nodes of the module that called the Function) and
each tensor it returns passes through :func:`graphpatch_cache.functions.forward_only`.

Exactness: the forward ops are the Function's own, so every value equals the model's, with
or without grad. The gradient would not be the Function's (its ``backward`` is custom code,
which the graph does not hold): ``forward_only`` makes a backward pass through it raise
:class:`~graphpatch_cache.errors.UnsupportedGradientError` instead of computing the
gradient of the inlined ops. For exact gradients keep the calling module opaque
(``ExtractionOptions(classes_to_skip_compiling=(TheModule,))``): its own forward runs.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Dict, List, Optional

import torch
import torch.fx

from .. import _compat
from ..trust.functions import forward_only

_APPLY_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\.apply\(")
_GRAD_SWITCH = _compat.set_grad_enabled


def _label(node: torch.fx.Node) -> str:
    """``Module.Function`` (``BloomGelu.GeLUFunction``): the class names of the module that
    called the Function and of the Function as the source wrote it, for messages."""
    found = _APPLY_CALL.findall(str(node.meta.get("stack_trace") or ""))
    function = found[-1] if found else "Function"
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    module = getattr(stack[-1][1], "__name__", "") if stack and isinstance(stack[-1], tuple) else ""
    return f"{module}.{function}" if module.isidentifier() else function


def _forward_outputs(body: torch.fx.GraphModule) -> Optional[List[Any]]:
    """The forward body's returned values: dynamo returns ``(outputs, saved_for_backward)``."""
    out = next(n for n in body.graph.nodes if n.op == "output").args[0]
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], (tuple, list)):
        return list(out[0])
    return None


def _inline_one(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    graph = gm.graph
    fwd_attr = node.args[0]
    if not isinstance(fwd_attr, torch.fx.Node) or fwd_attr.op != "get_attr":
        return False
    body = getattr(gm, str(fwd_attr.target), None)
    if not isinstance(body, torch.fx.GraphModule):
        return False
    outputs = _forward_outputs(body)
    body_nodes = [n for n in body.graph.nodes if n.op not in ("placeholder", "output")]
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    operands = list(node.args[2:])
    if outputs is None or len(placeholders) != len(operands) or any(
            n.op != "call_function" and n.op != "call_method" for n in body_nodes):
        return False  # not the shape we know: left as it is (serializing it refuses)
    env: Dict[torch.fx.Node, Any] = dict(zip(placeholders, operands))
    label = _label(node)
    with graph.inserting_before(node):
        for inner in body_nodes:
            if inner.target is _GRAD_SWITCH:
                continue  # the forward runs in the caller's grad mode; forward_only guards it
            env[inner] = graph.node_copy(inner, lambda n: env[n])
        results = []
        fakes = _compat.fake_value(node)
        for i, value in enumerate(torch.fx.node.map_arg(outputs, lambda n: env[n])):
            if not isinstance(value, torch.fx.Node):
                results.append(value)
                continue
            guarded = graph.call_function(forward_only, (label, value))
            guarded.meta = {k: node.meta[k] for k in ("stack_trace", "nn_module_stack") if k in node.meta}
            guarded.meta["example_value"] = fakes[i] if isinstance(fakes, (tuple, list)) else _compat.fake_value(value)
            results.append(guarded)
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
            for later in list(user.users):
                _substitute(later, user, results[user.args[1]])
            graph.erase_node(user)
        else:
            _substitute(user, node, tuple(results))
    bodies = node.args[:2]
    graph.erase_node(node)
    for attr in bodies:
        if isinstance(attr, torch.fx.Node) and attr.op == "get_attr" and not attr.users:
            graph.erase_node(attr)
    return True


def _substitute(user: torch.fx.Node, old: torch.fx.Node, new: Any) -> None:
    """Make ``user`` read ``new`` (a node, a constant or a tuple of them) where it read ``old``."""
    user.args = torch.fx.node.map_arg(user.args, lambda n: new if n is old else n)
    user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda n: new if n is old else n)


def inline_autograd_functions(gm: torch.fx.GraphModule) -> int:
    """Inline the forward of every custom autograd Function call in ``gm``'s graph (in place);
    returns how many were inlined. Calls of another shape are left for serialization to refuse
    (their module then stays opaque)."""
    apply = _compat.AUTOGRAD_FUNCTION_APPLY
    if apply is None:
        return 0
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is apply]
    return sum(_inline_one(gm, n) for n in calls)


__all__ = ["inline_autograd_functions"]
