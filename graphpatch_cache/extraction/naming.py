"""How each module call is named: its local name in the caller's graph and its module path.

The rule (one for every call)::

    A call is named by the attribute path its caller used to reach the module, relative to
    the calling module, with "." replaced by "_" (``self.h[17](x)`` -> ``h_17``,
    ``self.blocks["first"](x)`` -> ``blocks_first``). When one caller makes several calls
    through the same path, they are numbered in call order: ``a_0``, ``a_1``, ...

So ``self.b(x) * 2 + self.a(x + 1)`` with ``self.b = self.a`` gives calls ``b`` and ``a``
(not two numbered calls of one module), ``for _ in range(3): self.a(x)`` gives ``a_0``,
``a_1``, ``a_2``, and ``self.b(x); self.a(x); self.a(y); self.b(z)`` gives ``b_0``, ``a_0``,
``a_1``, ``b_1``. The call's module path (the qualified name used for its weights,
errors and accelerate hooks) is the caller's path followed by the same attribute path, so a
call through an alias reads its weights under that alias (``b.weight``).

Names are then made safe as they always were: a name starting with a digit gets ``sub_``
(a Sequential's children are ``sub_0``, ``sub_1``), a reserved one a trailing ``_``, and a
name the caller's graph already uses (its own parameter ``a_0``, or a second path that reads
the same once "." is "_") a trailing ``_``, in call order.

Where the path comes from, first that applies:

1. The call's own expression in the caller's code, when it is a constant chain from ``self``
   (``self.b(x)``, ``self.blocks["first"](x)``, ``self.h[-1](x)``). Dynamo records the
   caller's line with the call's columns in the marker's stack trace.
2. Otherwise (the module is a local variable, a loop over a container, a computed index)
   dynamo's *source* for the call: the last entry of the ``nn_module_stack`` metadata on our
   enter/opaque marker. It is not used first because dynamo keeps one source per module
   object, the one of its latest access: in ``self.head(self.seq(x))`` with ``head`` also
   inside ``seq``, the call to ``head`` carries ``seq.2``.

Either is resolved on the model's own objects and accepted only where every step is a
registered submodule (``_modules``) below the calling module and the walk ends at the very
module that was called, so a name always is a path ``get_submodule`` follows to it.

Fallback, where no such path exists: calls made inside a module that is not traced (an
opaque module: dynamo sees none of its code), and calls through something that is not a
registered submodule of the caller (a module held in a plain Python list or dict, reached
through a global, or stored on another object). Such a call takes, as its path, the module's
first registered name inside the caller (``named_modules`` order), else its first registered
name in the model; numbering then counts it with the other calls through that path.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch

from .local_names import escape_name
from .markers import ENTER, OPAQUE
from .records import CallRecord
from ..artifact.names import join_path

#: where capture's root puts the model: ``_CaptureRoot.model``, traced as ``L['self']``
_ROOT = "L['self'].model"
# Our Recorder replaces each module's ``forward`` by a closure around the bound forward;
# dynamo then reaches a module's ``self`` through that closure cell. The cell holds the
# module's bound forward, whose ``__self__`` is the module itself: the segment adds nothing.
_WRAPPER = re.compile(r"\.forward\.__closure__\[\d+\]\.cell_contents\.__self__")
# older torch writes ``._modules['x']`` where newer torch writes ``.x``
_MODULES = re.compile(r"\._modules\[(['\"])([^'\"\]]+)\1\]")
_TOKEN = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*|\d+)|\[(-?\d+|'[^']*'|\"[^\"]*\")\]")


@dataclass
class CallNames:
    """Names of every recorded call, by call index."""

    #: the call's name in its caller's graph (the model's own call: "")
    local: Dict[int, str] = field(default_factory=dict)
    #: the qualified module path the call is reached under ("" for the model's own call)
    path: Dict[int, str] = field(default_factory=dict)
    #: whether the path is the one the call used (from its call site or dynamo's source);
    #: False where the fallback named it
    from_source: Dict[int, bool] = field(default_factory=dict)


def call_sources(graph: torch.fx.Graph, calls: List[CallRecord]) -> Dict[int, Tuple[Optional[str], Optional[str]]]:
    """``(call-site expression, dynamo's source string)`` of each traced call, by call index
    (either may be None).

    Markers are matched to the eager records in order, as :class:`~.split.Splitter` does;
    the calls an opaque module makes were recorded but not traced, so they are skipped.
    """
    out: Dict[int, Tuple[Optional[str], Optional[str]]] = {}
    records = iter(calls)

    def descendants(record: CallRecord) -> int:
        return sum(1 + descendants(calls[c]) for c in record.children)

    for node in graph.nodes:
        if node.op != "call_function" or (node.target is not ENTER and node.target is not OPAQUE):
            continue
        record = next(records, None)
        if record is None or record.tag != node.args[0]:
            break  # the splitter reports the mismatch
        stack = node.meta.get("nn_module_stack") or {}
        source = None
        if stack:
            entry = list(stack.values())[-1]
            source = entry[0] if isinstance(entry, tuple) else entry
            source = source if isinstance(source, str) else None
        trace = node.meta.get("stack_trace")
        out[record.index] = (call_site(trace) if isinstance(trace, str) else None, source)
        if node.target is OPAQUE:
            for _ in range(descendants(record)):
                next(records, None)
    return out


_FRAME = re.compile(r'^\s*File "(.*)", line \d+, in (\S+)\s*$')
_CARETS = re.compile(r"^\s*[~^]+\s*$")


def call_site(trace: str) -> Optional[str]:
    """The expression of the call that entered the module, from the marker's stack trace.

    The marker is emitted inside our forward wrapper (``forward_with_markers``); the frame
    before the innermost wrapper frame is the caller's code. Its line is shown with carets
    under the call expression's columns (Python omits them when the call is the whole line).
    """
    lines = trace.splitlines()
    frames: List[Tuple[str, str, Optional[str], Optional[str]]] = []  # file, function, code, carets
    i = 0
    while i < len(lines):
        match = _FRAME.match(lines[i])
        if match is None:
            i += 1
            continue
        if i + 1 >= len(lines) or _FRAME.match(lines[i + 1]):
            frames.append((match.group(1), match.group(2), None, None))  # no source line (exec'd code)
            i += 1
            continue
        carets = lines[i + 2] if i + 2 < len(lines) and _CARETS.match(lines[i + 2]) else None
        frames.append((match.group(1), match.group(2), lines[i + 1], carets))
        i += 3 if carets is not None else 2
    wrappers = [k for k, f in enumerate(frames) if f[1] == "forward_with_markers" and f[0].endswith("markers.py")]
    if not wrappers or wrappers[-1] == 0:
        return None
    filename, _, code, carets = frames[wrappers[-1] - 1]
    if filename.endswith("markers.py") or code is None:
        return None  # the caller's own frame or its line is not shown (torch.nn containers)
    if carets is None:
        return code.strip()
    marks = [k for k, c in enumerate(carets) if c in "~^"]
    start, end = marks[0], marks[-1] + 1
    # dynamo's carets can run one column past a call nested in another's arguments
    for stop in (end, end - 1):
        if _call_chain(code[start:stop]) is not None:
            return code[start:stop]
    return code[start:end]


def _call_chain(expression: str) -> Optional[List[Any]]:
    """``self.blocks["first"](x)`` -> ``["blocks", "first"]``: the constant attribute and
    subscript chain from ``self`` that a call expression calls, or None for anything else
    (a local variable, a computed index, not one call)."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        return None
    if not isinstance(tree.body, ast.Call):
        return None
    chain: List[Any] = []
    node = tree.body.func
    while True:
        if isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript) and _constant_key(node.slice) is not None:
            chain.append(_constant_key(node.slice))
            node = node.value
        else:
            break
    if not (isinstance(node, ast.Name) and node.id == "self") or not chain:
        return None
    return chain[::-1]


def _constant_key(node: ast.AST) -> Any:
    """``2``, ``-1`` or ``"first"`` written as a subscript; None for anything else."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _constant_key(node.operand)
        return -inner if isinstance(inner, int) else None
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, str)) and not isinstance(node.value, bool):
        return node.value
    return None


def _registered_walk(start: Any, tokens: List[Any]) -> Optional[Tuple[Any, List[str]]]:
    """Walk ``tokens`` from ``start`` through registered submodules only: (end, names)."""
    obj, names = start, []
    for token in tokens:
        try:
            obj, name = _step(obj, token)
        except Exception:  # not a path on these objects
            return None
        if name is None:
            return None
        names.append(name)
    return obj, names


def site_path(expression: str, caller: torch.nn.Module, callee: torch.nn.Module) -> Optional[str]:
    """The registered path from ``caller`` to ``callee`` that a call expression spells."""
    chain = _call_chain(expression)
    if chain is None:
        return None
    walked = _registered_walk(caller, chain)
    if walked is None or walked[0] is not callee:
        return None
    return ".".join(walked[1])


def _tokens(source: str) -> Optional[List[Any]]:
    """``L['self'].model.md.bar[2]`` -> ``["md", "bar", 2]`` (relative to the model), or None
    for a source that does not start at the model or does not parse."""
    source = _MODULES.sub(r".\2", _WRAPPER.sub("", source))
    if not source.startswith(_ROOT):
        return None
    rest = source[len(_ROOT):]
    tokens: List[Any] = []
    pos = 0
    for match in _TOKEN.finditer(rest):
        if match.start() != pos:
            return None
        pos = match.end()
        attr, item = match.group(1), match.group(2)
        if attr is not None:
            tokens.append(attr)
        elif item[0] in "'\"":
            tokens.append(item[1:-1])
        else:
            tokens.append(int(item))
    return tokens if pos == len(rest) else None


def _step(obj: Any, token: Any) -> Tuple[Any, Optional[str]]:
    """One step of a source on the real objects: (next object, its registered child name or
    None when the step is not through ``_modules``)."""
    modules = getattr(obj, "_modules", None) if isinstance(obj, torch.nn.Module) else None
    if isinstance(token, int):
        if isinstance(obj, (torch.nn.ModuleList, torch.nn.Sequential)):
            keys = list(obj._modules)
            if -len(keys) <= token < len(keys):
                key = keys[token]
                return obj._modules[key], key
        return obj[token], None
    if modules is not None and token in modules:
        return modules[token], token
    if isinstance(obj, torch.nn.ModuleDict):
        return obj[token], None
    return getattr(obj, token), None


def relative_path(
    model: torch.nn.Module, source: str, caller: torch.nn.Module, callee: torch.nn.Module
) -> Optional[str]:
    """The registered attribute path from ``caller`` to ``callee`` that ``source`` walks, or
    None where the source does not reach ``callee`` through ``caller``'s registered submodules."""
    tokens = _tokens(source)
    if tokens is None:
        return None
    objects = [model]
    steps: List[Optional[str]] = []
    obj: Any = model
    for token in tokens:
        try:
            obj, name = _step(obj, token)
        except Exception:  # a source we cannot follow on the objects: fall back
            return None
        objects.append(obj)
        steps.append(name)
    if objects[-1] is not callee:
        return None
    starts = [i for i, o in enumerate(objects[:-1]) if o is caller]
    if not starts:
        return None
    rel = steps[starts[-1]:]
    if any(name is None for name in rel):
        return None  # part of the way is not a registered submodule (a plain list, a property)
    return ".".join(rel)  # type: ignore[arg-type]


def module_names(model: torch.nn.Module) -> Dict[int, List[str]]:
    """Every registered name of every module (aliases included), in ``named_modules`` order."""
    names: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def fallback_path(names: Dict[int, List[str]], module: torch.nn.Module, under: str) -> str:
    """The module's first registered name inside ``under``, else its first name overall."""
    own = names.get(id(module), ["?"])
    if under:
        inside = [n for n in own if n.startswith(under + ".")]
        if inside:
            return inside[0]
    return own[0]


def name_calls(
    model: torch.nn.Module,
    calls: List[CallRecord],
    graph: torch.fx.Graph,
    names: Optional[Dict[int, List[str]]] = None,
) -> CallNames:
    """Apply the module docstring's rule to every recorded call (``names``: see
    :func:`module_names`)."""

    names = module_names(model) if names is None else names
    sources = call_sources(graph, calls)
    result = CallNames()
    by_caller: Dict[Optional[int], List[CallRecord]] = {}
    for call in calls:  # calls are recorded in call order, a caller before its callees
        by_caller.setdefault(call.parent, []).append(call)
        if call.parent is None:
            result.local[call.index] = ""
            result.path[call.index] = ""
            result.from_source[call.index] = True
            continue
        caller = calls[call.parent]
        caller_path = result.path[call.parent]
        rel = None
        site, source = sources.get(call.index, (None, None))
        if site is not None:
            rel = site_path(site, caller.module, call.module)
        if rel is None and source is not None:
            rel = relative_path(model, source, caller.module, call.module)
        resolved = rel is not None
        if rel is not None:
            path = join_path(caller_path, rel)
        else:
            path = fallback_path(names, call.module, caller_path)
            rel = path[len(caller_path) + 1:] if caller_path and path.startswith(caller_path + ".") else path
        result.path[call.index] = path
        result.from_source[call.index] = resolved
        result.local[call.index] = rel  # made local below, once all calls of the caller are known
    for caller_index, siblings in by_caller.items():
        if caller_index is None:
            continue
        rels = [result.local[c.index] for c in siblings]
        taken = {escape_name(n) for n in _own_tensor_names(calls[caller_index].module)}
        for call, local in zip(siblings, _number(rels, escape_name, taken)):
            result.local[call.index] = local
    return result


def _own_tensor_names(module: torch.nn.Module) -> List[str]:
    """Names the caller's graph gives its own parameters, buffers and tensor attributes; a
    call may not take one (``self.a`` called twice next to a parameter ``self.a_0``)."""
    own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    return own + [n for n, v in vars(module).items() if isinstance(v, torch.Tensor) and not n.startswith("__")]


def _number(rels: List[str], escape: Any, taken: Set[str]) -> Iterator[str]:
    """Local names for one caller's calls (given by their attribute paths, in call order):
    a path used once keeps its name, a path used k > 1 times gets ``_0`` .. ``_{k-1}``; a
    name already ``taken`` gets a trailing ``_``."""
    counts: Dict[str, int] = {}
    for rel in rels:
        counts[rel] = counts.get(rel, 0) + 1
    seen: Dict[str, int] = {}
    taken = set(taken)
    for rel in rels:
        base = rel.replace(".", "_")
        if counts[rel] > 1:
            k = seen.get(rel, 0)
            seen[rel] = k + 1
            name = escape(f"{base}_{k}")
        else:
            name = escape(base)
        # two paths that read the same once "." is "_" (``h.1`` and an attribute ``h_1``)
        while name in taken:
            name = name + "_"
        taken.add(name)
        yield name


__all__ = ["CallNames", "call_site", "call_sources", "fallback_path", "module_names", "name_calls", "relative_path",
           "site_path"]
