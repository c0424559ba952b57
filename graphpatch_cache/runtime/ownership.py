"""Which values a graph call owns: tensors whose storage is made during the call and is seen
by nothing outside it, so that a probe may keep the tensor itself instead of a copy.

A :class:`~graphpatch_cache.patches.ProbePatch` promises a copy of the value it saw. A copy
is needed only when something could change the tensor after the probe took it: the graph
itself (a write in place), or the caller (the model's inputs and parameters, and the output
it is handed). When no graph of a call writes in place or runs a module's own code (see
:attr:`graphpatch_cache.runtime.patching.PatchInstaller.writes`) and every active patch only looks at
its value, a value is *owned* when its storage class, the values that may share its storage,
holds

- no placeholder of the root graph (the caller's tensors; a child graph's placeholder is its
  parent's value, owned or not there),
- no ``get_attr`` (a parameter or buffer) and no call of an opaque or 8-bit graph,
- no value the root graph returns (the caller may write into it).

Two values may share storage unless the later one is made by an op that always allocates
its result: an op of ``_FUNCTIONS`` or ``_METHODS`` (explicit lists: an op's schema does not say
reliably whether it may return its input; ``dropout`` in eval mode and ``type_as`` do), an
arithmetic operator whose left operand is a tensor (``(a,) + (b,)`` holds ``a`` itself, and
``(a,) * n`` repeats it), or a child graph whose returned values it owns. Everything else
(views, ``to``, ``contiguous``, ``getitem``, unknown ops) is assumed to share storage with
every value among its arguments.

Owned values of one storage class (a node and its views, a child graph's input and its
parent's value) are the same storage: probes that keep them share it.

Whether a value is a tensor is inferred from the ops (the root graph's placeholders are
tensors, and so are the results of tensor ops), never read from the artifact's ``meta``,
which a forged artifact could fill with anything.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, FrozenSet, List, Optional, Set, Tuple

from ..artifact import ModuleGraph
from ..trust.rules import ref

#: call_function targets that always return a tensor they allocate
_FUNCTIONS = frozenset({
    "torch.nn.functional.linear", "torch.matmul", "torch.bmm", "torch.mm", "torch.addmm", "torch.baddbmm",
    "torch.nn.functional.scaled_dot_product_attention", "torch.nn.functional.embedding",
    "torch.nn.functional.layer_norm", "torch.nn.functional.rms_norm", "torch.nn.functional.group_norm",
    "torch.nn.functional.silu", "torch.nn.functional.gelu", "torch.nn.functional.relu", "torch.nn.functional.softmax",
    "torch.nn.functional.log_softmax", "torch.nn.functional.sigmoid", "torch.nn.functional.tanh",
    "torch.softmax", "torch.log_softmax", "torch.sigmoid", "torch.tanh", "torch.exp", "torch.log", "torch.sqrt",
    "torch.rsqrt", "torch.pow", "torch.mean", "torch.sum", "torch.cumsum", "torch.cat", "torch.stack",
    "torch.diff", "torch.outer", "torch.sin", "torch.cos", "torch.abs", "torch.erf",
    "torch.arange", "torch.ones", "torch.zeros", "torch.full", "torch.empty", "torch.tensor",
    "torch.ones_like", "torch.zeros_like", "torch.full_like", "torch.empty_like", "torch.clone",
    "torch.tril", "torch.triu", "torch.masked_fill", "torch.add", "torch.sub", "torch.mul", "torch.div",
})
#: Tensor methods that always return a tensor they allocate
_METHODS = frozenset({
    "mean", "sum", "pow", "rsqrt", "sqrt", "exp", "log", "sin", "cos", "tanh", "sigmoid", "softmax",
    "log_softmax", "cumsum", "masked_fill", "clone", "new_ones", "new_zeros", "new_full", "new_empty",
    "new_tensor", "add", "sub", "mul", "div", "matmul", "bmm", "abs", "neg", "tril", "triu", "erf",
})
#: Tensor methods that return a tensor (perhaps their own, or a view of it)
_TENSOR_METHODS = _METHODS | frozenset({
    "view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "expand_as", "contiguous",
    "to", "float", "half", "bfloat16", "double", "long", "int", "bool", "type_as", "flatten", "view_as",
    "reshape_as", "repeat", "narrow", "select", "t", "detach", "clamp",
})
#: functions that return a tensor when their first argument is one (perhaps it, or a view of it)
_TENSOR_FUNCTIONS = frozenset({
    "torch.nn.functional.dropout", "torch.flatten", "torch.transpose", "torch.reshape", "torch.squeeze",
    "torch.unsqueeze", "torch.narrow", "torch.permute", "torch.select", "torch.t", "torch.clamp",
    "torch.nn.functional.pad", "torch.broadcast_to", "torch.atleast_1d", "torch.atleast_2d",
})
#: arithmetic operators: a new tensor when the left operand is a tensor (or the only one is)
_OPERATORS = frozenset({
    "_operator.add", "_operator.sub", "_operator.mul", "_operator.truediv", "_operator.floordiv",
    "_operator.matmul", "_operator.pow", "_operator.mod", "_operator.and_", "_operator.or_",
    "_operator.xor", "_operator.eq", "_operator.ne", "_operator.lt", "_operator.le", "_operator.gt", "_operator.ge",
})
_UNARY = frozenset({"_operator.neg", "_operator.invert"})

#: a value's inferred type: a tensor, a scalar (numbers, sizes, dtypes: no storage), a tuple
#: of known element types, or unknown (None)
_Type = Any
TENSOR = "tensor"
SCALAR = "scalar"
#: Tensor methods that return numbers or sizes
_SCALAR_METHODS = frozenset({"size", "dim", "numel", "stride", "element_size", "item", "nelement", "ndimension",
                             "is_contiguous", "is_floating_point", "get_device"})
_SCALAR_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"})


def _refs(value: Any, out: List[str]) -> None:
    """The node names an encoded value refers to (``{"n": name}``), into ``out``."""
    name = ref(value)
    if name is not None:
        out.append(name)
    elif isinstance(value, dict):
        for item in value.values():
            _refs(item, out)
    elif isinstance(value, list):
        for item in value:
            _refs(item, out)


def _positional(nd: Any) -> List[Any]:
    args = nd.args.get("t") if isinstance(nd.args, dict) else None
    return args if isinstance(args, list) else []


def _keywords(nd: Any) -> List[Any]:
    pairs = nd.kwargs.get("d") if isinstance(nd.kwargs, dict) else None
    return pairs if isinstance(pairs, list) else []


def _type_of(value: Any, types: Dict[str, _Type]) -> _Type:
    """The type of an encoded argument: a node's, a tuple literal's, or unknown."""
    name = ref(value)
    if name is not None:
        return types.get(name)
    if isinstance(value, dict) and isinstance(value.get("t"), list) and len(value) == 1:
        return ("tuple", [_type_of(v, types) for v in value["t"]])
    if value is None or isinstance(value, (bool, str)) or _is_number(value):
        return SCALAR
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, dict) and set(value) == {"f"})


def _scalar(value: Any, types: Dict[str, _Type]) -> bool:
    """Whether an encoded argument holds no tensor: a number, None, a scalar node, or a tuple of them."""
    if value is None or isinstance(value, (bool, str)) or _is_number(value):
        return True
    t = _type_of(value, types)
    return t == SCALAR or (isinstance(t, tuple) and all(x == SCALAR for x in t[1]))


def _allocates(nd: Any, types: Dict[str, _Type]) -> bool:
    """Whether ``nd`` always returns a tensor it allocates (never (part of) an argument)."""
    if any(isinstance(p, list) and p and p[0] in ("out", "inplace") for p in _keywords(nd)):
        return False  # (writes: graphs with writes copy everything anyway)
    args = _positional(nd)
    if nd.op == "call_function":
        if nd.target in _FUNCTIONS:
            return True
        if nd.target in _UNARY:
            return len(args) == 1 and _type_of(args[0], types) == TENSOR
        if nd.target in _OPERATORS and len(args) == 2:
            left, right = (_type_of(a, types) for a in args)
            return left == TENSOR or (_is_number(args[0]) and right == TENSOR)
        return False
    if nd.op == "call_method":
        return nd.target in _METHODS and bool(args) and _type_of(args[0], types) == TENSOR
    return False


def _result_type(nd: Any, types: Dict[str, _Type], allocates: bool) -> _Type:
    if allocates:
        return TENSOR
    args = _positional(nd)
    receiver = _type_of(args[0], types) if args else None
    if nd.op == "call_method" and nd.target in _SCALAR_METHODS and receiver == TENSOR:
        return SCALAR
    if nd.op == "call_function":
        if nd.target == "torch.Size":
            return SCALAR
        if nd.target == "builtins.getattr" and len(args) == 2 and args[1] in _SCALAR_ATTRIBUTES and receiver == TENSOR:
            return SCALAR
        if (nd.target in _OPERATORS or nd.target in _UNARY or nd.target == "_operator.getitem") and all(
                _scalar(a, types) for a in args):
            return SCALAR  # (sizes, their parts and arithmetic on them)
    if nd.op == "call_method" and nd.target in _TENSOR_METHODS and receiver == TENSOR:
        return TENSOR
    if nd.op == "call_function" and nd.target in _TENSOR_FUNCTIONS and receiver == TENSOR:
        return TENSOR
    if nd.op == "call_function" and nd.target == "_operator.getitem" and len(args) == 2:
        container = _type_of(args[0], types)
        if container == TENSOR:
            return TENSOR  # (indexing a tensor gives a tensor: a view, or a gathered copy)
        if isinstance(container, tuple) and isinstance(args[1], int) and -len(container[1]) <= args[1] < len(container[1]):
            return container[1][args[1]]
    return None


class _Summary:
    """One graph's storage classes, given its inputs' types: per node, its class; per class,
    whether it holds a parameter (or an opaque or 8-bit call's result) and which
    placeholders; the classes of the returned values; the returned value's type."""

    __slots__ = ("cls", "param", "inputs", "returned", "placeholders", "output_type", "calls", "tensors")

    def __init__(self, graph: ModuleGraph, input_types: Tuple[_Type, ...], path: str,
                 is_tensor: Callable[[str, str], bool]) -> None:
        parent: Dict[str, str] = {}

        def find(x: str) -> str:
            root = x
            while parent[root] != root:
                root = parent[root]
            while parent[x] != root:
                parent[x], x = root, parent[x]
            return root

        def union(a: str, b: str) -> None:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[ra] = rb

        children = {child.name: child for child in graph.children}
        types: Dict[str, _Type] = {}
        params: List[str] = []
        self.placeholders: List[str] = []
        #: per child graph: the summary of its call
        self.calls: Dict[str, Tuple[ModuleGraph, "_Summary", Any]] = {}
        self.output_type: _Type = None
        out: Optional[str] = None
        for nd in graph.nodes:
            parent[nd.name] = nd.name
            refs: List[str] = []
            _refs(nd.args, refs)
            _refs(nd.kwargs, refs)
            refs = [r for r in refs if r in parent]
            if nd.op == "placeholder":
                i = len(self.placeholders)
                types[nd.name] = input_types[i] if i < len(input_types) else None
                self.placeholders.append(nd.name)
            elif nd.op == "get_attr":
                params.append(nd.name)
                types[nd.name] = TENSOR if is_tensor(path, nd.target) else None
            elif nd.op == "output":
                out = nd.name
                for r in refs:  # (the output node's value is the returned value)
                    union(nd.name, r)
                args = _positional(nd)
                self.output_type = types[nd.name] = _type_of(args[0], types) if len(args) == 1 else None
            elif nd.op == "call_module":
                child = children.get(nd.target)
                if child is None or child.kind != "compiled":
                    params.append(nd.name)
                    continue
                args = _positional(nd)
                plain = not _keywords(nd)
                summary = _summary(child, tuple(_type_of(a, types) for a in args) if plain else (),
                                   f"{path}.{child.name}" if path else child.name, is_tensor)
                self.calls[child.name] = (child, summary, nd)
                types[nd.name] = summary.output_type
                if any(summary.param.get(c, False) for c in summary.returned):
                    params.append(nd.name)
                if any(summary.inputs.get(c) for c in summary.returned):
                    for r in refs:  # (it may return (a view of) what it was given)
                        union(nd.name, r)
            else:
                allocates = _allocates(nd, types)
                types[nd.name] = _result_type(nd, types, allocates)
                if not allocates and types[nd.name] != SCALAR:  # (a scalar holds no storage)
                    for r in refs:
                        union(nd.name, r)
        self.cls = {name: find(name) for name in parent}
        self.tensors = frozenset(name for name, t in types.items() if t == TENSOR)
        self.param: Dict[str, bool] = {self.cls[name]: True for name in params}
        self.inputs: Dict[str, Set[str]] = {}
        for name in self.placeholders:
            self.inputs.setdefault(self.cls[name], set()).add(name)
        self.returned: Set[str] = {self.cls[out]} if out is not None else set()


def _summary(graph: ModuleGraph, input_types: Tuple[_Type, ...], path: str,
             is_tensor: Callable[[str, str], bool]) -> _Summary:
    """The summary of ``graph`` (at ``path``) called with inputs of these types, computed once
    per graph object and input types (the kinds of a graph's attributes are the model's
    structure, the same wherever the graph is bound)."""
    memo: Dict[Any, _Summary] = graph.__dict__.get("_storage_summaries")  # type: ignore[assignment]
    if memo is None:
        memo = {}
        object.__setattr__(graph, "_storage_summaries", memo)  # frozen: a cache, not a field
    key = repr(input_types)
    cached = memo.get(key)
    if cached is None:
        cached = memo[key] = _Summary(graph, input_types, path, is_tensor)
    return cached


def owned_values(root: ModuleGraph, is_tensor: Callable[[str, str], bool]) -> Dict[str, FrozenSet[str]]:
    """Per graph path under ``root`` (the root graph of a call: its placeholders are the
    caller's tensors, its output goes to the caller), the tensor nodes whose values the call
    owns (see the module docstring). ``is_tensor(graph path, attribute)``: whether the bound
    graph's attribute is a tensor."""
    count = sum(1 for nd in root.nodes if nd.op == "placeholder")
    out: Dict[str, FrozenSet[str]] = {}

    def walk(summary: _Summary, path: str, owned_inputs: Set[str], output_owned: bool) -> None:
        bad = set(summary.param)
        for cls, names in summary.inputs.items():
            if not names <= owned_inputs:
                bad.add(cls)
        if not output_owned:
            bad |= summary.returned
        owned = frozenset(name for name, cls in summary.cls.items() if cls not in bad)
        out[path] = owned & summary.tensors
        for name, (_child, child_summary, call) in summary.calls.items():
            given: Set[str] = set()
            if not _keywords(call):
                for placeholder, arg in zip(child_summary.placeholders, _positional(call)):
                    arg_refs: List[str] = []
                    _refs(arg, arg_refs)
                    if all(r in owned for r in arg_refs):
                        given.add(placeholder)
            walk(child_summary, f"{path}.{name}" if path else name, given, call.name in owned)

    walk(_summary(root, (TENSOR,) * count, "", is_tensor), "", set(), False)
    return out


__all__ = ["owned_values"]
