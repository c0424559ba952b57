"""What ``NodePath._shape`` returns: the recorded shape of a value, as data.

Graphs are shape-generic, so a dimension traced symbolically is recorded as its symbol
(``s27``) or an expression of symbols (``s27*s52``, ``(s25//2)``), not as the example's size.

- every dim concrete: a :class:`torch.Size` (``torch.zeros(node._shape)`` works);
- some dim symbolic: a :class:`SymbolicShape`, a tuple of ints and :class:`SymbolicSize`
  (a ``str`` holding the expression, shown by its name: ``SymbolicShape([batch, seq, 32])``,
  see :mod:`.size_names`); ``.at(*inputs)`` gives the ``torch.Size`` for a call with those
  inputs, ``.subs({"s27": 5})`` (or ``.subs({"seq": 5})``) for given symbol sizes,
  ``.sources`` says which input dimension each symbol is, ``.names`` what it is called;
- a non-tensor value: the name of its type (``"int"``), as graphpatch gives it;
- a nested value: a :class:`ShapeTuple` (tuples, lists) or :class:`ShapeDict` (dicts,
  ModelOutputs) of the above, whose parts are attributes as in node paths (``.sub_0``,
  ``.logits``); ``.at(...)`` and ``.subs(...)`` map over the parts;
- nothing recorded (a module graph, or a value without metadata): ``None``.

Expressions come from the artifact, which may come from a shared store, so they are never
passed to ``eval`` or sympy: a small evaluator accepts integer arithmetic, ``Max``, ``Min``
and ``Mod`` over known symbols and nothing else.
"""

from __future__ import annotations

import ast
import operator
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..artifact import ModuleGraph
from ..errors import ShapeError
from .size_names import render, size_names

#: ``(args, kwargs) -> the root graph's placeholder tensors`` for a call with those inputs
InputBinder = Callable[[Tuple[Any, ...], Dict[str, Any]], List[torch.Tensor]]

_MAX_EXPR = 500
_BINOPS: Dict[type, Callable[[int, int], int]] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_FUNCS: Dict[str, Callable[..., int]] = {"Max": max, "Min": min, "Mod": operator.mod, "PythonMod": operator.mod,
          "FloorDiv": operator.floordiv}


class SymbolicSize(str):
    """One symbolic dimension: the text of its expression over the graph's size symbols
    (``s27``, ``s27*s52``). A ``str``, so it compares (and ``str()`` gives) its text;
    ``repr`` shows its :attr:`name` (``seq``, ``past + seq``: see :mod:`.size_names`)."""

    _name: str

    def __new__(cls, text: str, name: Optional[str] = None) -> "SymbolicSize":
        self = super().__new__(cls, text)
        self._name = name if name is not None else str.__str__(self)
        return self

    @property
    def name(self) -> str:
        """What the size is called where the tree and shapes show it (its text where no
        name is known)."""
        return self.__dict__.get("_name", str.__str__(self))

    def __repr__(self) -> str:
        return self.name

    @property
    def symbols(self) -> Tuple[str, ...]:
        """The symbols the expression uses, in order of first use."""
        try:
            tree = ast.parse(self, mode="eval")
        except SyntaxError:
            return ()
        seen: Dict[str, None] = {}
        for nd in ast.walk(tree):
            if isinstance(nd, ast.Name) and nd.id not in _FUNCS:
                seen.setdefault(nd.id, None)
        return tuple(seen)

    def evaluate(self, sizes: Mapping[str, int]) -> int:
        """The size for ``sizes`` (``{symbol: int}``).

        :raises ShapeError: a symbol without a size, or an expression this evaluator does not
            accept.
        """
        return _evaluate(str(self), sizes)


def _evaluate(text: str, sizes: Mapping[str, int]) -> int:
    def bad(why: str) -> ShapeError:
        return ShapeError(f"cannot evaluate the recorded size {text!r}: {why}",
                          hint="pass the symbol sizes with .subs({...}), or read the size from a probe")

    if len(text) > _MAX_EXPR:
        raise bad("the expression is too long")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise bad("not an expression") from exc

    def ev(nd: ast.AST) -> int:
        if isinstance(nd, ast.Expression):
            return ev(nd.body)
        if isinstance(nd, ast.Constant) and type(nd.value) is int:
            return int(nd.value)
        if isinstance(nd, ast.Name):
            if nd.id not in sizes:
                raise bad(f"no size for symbol {nd.id!r} (known: {sorted(sizes) or 'none'})")
            return int(sizes[nd.id])
        if isinstance(nd, ast.BinOp) and type(nd.op) in _BINOPS:
            return _BINOPS[type(nd.op)](ev(nd.left), ev(nd.right))
        if isinstance(nd, ast.UnaryOp) and isinstance(nd.op, (ast.USub, ast.UAdd)):
            value = ev(nd.operand)
            return -value if isinstance(nd.op, ast.USub) else value
        if (isinstance(nd, ast.Call) and isinstance(nd.func, ast.Name) and nd.func.id in _FUNCS
                and not nd.keywords and nd.args):
            return _FUNCS[nd.func.id](*[ev(a) for a in nd.args])
        raise bad(f"it uses {type(nd).__name__}, which the size evaluator does not accept")

    return ev(tree)


class ShapeScope:
    """Where a tree of graphs gets its symbol sizes: the root graph's inputs.

    :ivar sources: symbol -> (placeholder index, placeholder name, dim) of its first plain
        occurrence in the root graph's inputs.
    """

    def __init__(self, placeholder_shapes: Sequence[Tuple[str, Optional[Sequence[Any]]]],
                 binder: Optional[InputBinder] = None, why_unbound: str = "") -> None:
        self.placeholder_shapes = list(placeholder_shapes)
        self.binder = binder
        self.why_unbound = why_unbound
        self.sources: Dict[str, Tuple[int, str, int]] = {}
        for i, (name, shape) in enumerate(self.placeholder_shapes):
            for d, dim in enumerate(shape or ()):
                if isinstance(dim, str) and dim.isidentifier():
                    self.sources.setdefault(dim, (i, name, d))
        #: symbol -> display name (``{"s52": "batch"}``), see :mod:`.size_names`
        self.names: Dict[str, str] = size_names(self.placeholder_shapes)

    def symbol_sizes(self, sizes: Mapping[str, int]) -> Dict[str, int]:
        """``sizes`` keyed by symbols, where a key is a size's name (``{"seq": 5}``)."""
        by_name = {name: sym for sym, name in self.names.items()}
        return {by_name.get(k, k): v for k, v in sizes.items()}

    def sizes_for(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, int]:
        """Symbol sizes of a call with ``(args, kwargs)``.

        :raises ShapeError: no inputs are known for these graphs, or the inputs do not fit.
        """
        if self.binder is None:
            raise ShapeError(
                "the sizes of these graphs do not follow from the model's inputs" + (f": {self.why_unbound}" if self.why_unbound else ""),
                hint="pass the symbol sizes with .subs({...})")
        tensors = self.binder(args, kwargs)
        if len(tensors) != len(self.placeholder_shapes):
            raise ShapeError(
                f"these inputs have {len(tensors)} tensors, the graph takes {len(self.placeholder_shapes)}",
                hint="pass the inputs as you would call the PatchableGraph")
        sizes: Dict[str, int] = {}
        for tensor, (name, shape) in zip(tensors, self.placeholder_shapes):
            if shape is None:
                continue
            if len(shape) != tensor.dim():
                raise ShapeError(f"input {name!r} has {tensor.dim()} dims here, {len(shape)} in the graph",
                                 hint="pass inputs of the form the graph was extracted for")
            for d, (dim, size) in enumerate(zip(shape, tensor.shape)):
                if isinstance(dim, int):
                    if dim != size:
                        raise ShapeError(
                            f"input {name!r} has size {size} in dim {d}; the graph was extracted for size {dim}",
                            hint="look at the graph of this call with pg.graph_for(...)")
                elif dim.isidentifier():
                    if sizes.setdefault(dim, int(size)) != size:
                        raise ShapeError(
                            f"input {name!r} has size {size} in dim {d}, but the graph traced it as {dim}, "
                            f"which another input gives as {sizes[dim]}",
                            hint="pass inputs of the form the graph was extracted for")
        return sizes


class SymbolicShape(Tuple[Any, ...]):
    """A tensor shape with symbolic dims: ints and :class:`SymbolicSize` (see the module
    docstring). Prints like ``torch.Size``: ``SymbolicShape([s52, s27, 32])``."""

    _scope: Optional[ShapeScope]

    def __new__(cls, dims: Sequence[Any], scope: Optional[ShapeScope] = None) -> "SymbolicShape":
        names = scope.names if scope is not None else {}
        self = super().__new__(cls, [d if isinstance(d, int) else SymbolicSize(d, render(str(d), names)) for d in dims])
        self._scope = scope
        return self

    def __repr__(self) -> str:
        return f"SymbolicShape([{', '.join(repr(d) for d in self)}])"

    __str__ = __repr__

    @property
    def symbols(self) -> Tuple[str, ...]:
        """Every symbol the dims use, in order."""
        seen: Dict[str, None] = {}
        for d in self:
            if isinstance(d, SymbolicSize):
                for s in d.symbols:
                    seen.setdefault(s, None)
        return tuple(seen)

    @property
    def sources(self) -> Dict[str, str]:
        """Which input dimension each symbol stands for: ``{"s27": "input_ids.shape[1]"}``
        (symbols that no input dimension gives, such as data-dependent sizes, are left out)."""
        known = self._scope.sources if self._scope is not None else {}
        return {s: f"{known[s][1]}.shape[{known[s][2]}]" for s in self.symbols if s in known}

    @property
    def names(self) -> Dict[str, str]:
        """What each named symbol is called: ``{"s52": "batch", "s27": "seq"}`` (symbols
        without a name are left out)."""
        known = self._scope.names if self._scope is not None else {}
        return {s: known[s] for s in self.symbols if s in known}

    def subs(self, sizes: Mapping[str, int]) -> torch.Size:
        """The concrete shape for symbol sizes ``{symbol: int}`` (a symbol's name works too:
        ``{"batch": 2, "seq": 5}``).

        :raises ShapeError: a symbol has no size.
        """
        if self._scope is not None:
            sizes = self._scope.symbol_sizes(sizes)
        return torch.Size([d if isinstance(d, int) else d.evaluate(sizes) for d in self])

    def at(self, *args: Any, **kwargs: Any) -> torch.Size:
        """The concrete shape for a call with these inputs (as you would call the
        PatchableGraph).

        :raises ShapeError: the inputs do not fit the graph, or a size does not follow from
            them.
        """
        if self._scope is None:
            raise ShapeError("this shape is not attached to a graph's inputs", hint="use .subs({...})")
        return self.subs(self._scope.sizes_for(args, kwargs))

    def __reduce__(self) -> Any:
        return (SymbolicShape, (tuple(str(d) if isinstance(d, SymbolicSize) else d for d in self),))


def _map_leaves(value: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(value, (ShapeTuple, ShapeDict)):
        return value._map(fn)
    return fn(value)


def _concrete(value: Any, sizes: Mapping[str, int]) -> Any:
    return value.subs(sizes) if isinstance(value, SymbolicShape) else value


class _NestedShape:
    """``subs``/``at`` of a nested shape: its ``_map`` applied to every symbolic part."""

    _scope: Optional[ShapeScope]

    def _map(self, fn: Callable[[Any], Any]) -> Any:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def subs(self, sizes: Mapping[str, int]) -> Any:
        """Every symbolic part made concrete for ``{symbol: int}``."""
        return self._map(lambda v: _concrete(v, sizes))

    def at(self, *args: Any, **kwargs: Any) -> Any:
        """Every symbolic part made concrete for a call with these inputs."""
        if self._scope is None:
            raise ShapeError("this shape is not attached to a graph's inputs", hint="use .subs({...})")
        return self.subs(self._scope.sizes_for(args, kwargs))


class ShapeTuple(_NestedShape, Tuple[Any, ...]):
    """The shapes of a tuple's or list's parts; ``.sub_0`` is ``[0]``, as in node paths."""

    type_name: str
    _scope: Optional[ShapeScope]

    def __new__(cls, items: Sequence[Any], type_name: str = "tuple", scope: Optional[ShapeScope] = None) -> "ShapeTuple":
        self = super().__new__(cls, items)
        self.type_name = type_name
        self._scope = scope
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("sub_") and name[4:].isdigit() and int(name[4:]) < len(self):
            return self[int(name[4:])]
        raise AttributeError(f"{self.type_name} shape has no part {name!r}; parts: "
                             f"{[f'sub_{i}' for i in range(len(self))]}")

    def __dir__(self) -> List[str]:
        return [f"sub_{i}" for i in range(len(self))] + ["at", "subs"]

    def __repr__(self) -> str:
        return f"{self.type_name}(" + ", ".join(repr(v) for v in self) + ")"

    __str__ = __repr__

    def _map(self, fn: Callable[[Any], Any]) -> "ShapeTuple":
        return ShapeTuple([_map_leaves(v, fn) for v in self], self.type_name, self._scope)

    def __reduce__(self) -> Any:
        return (ShapeTuple, (tuple(self), self.type_name))


class ShapeDict(_NestedShape, Dict[str, Any]):
    """The shapes of a dict's or ModelOutput's fields; fields are attributes too."""

    type_name: str
    _scope: Optional[ShapeScope]

    def __init__(self, fields: Mapping[str, Any], type_name: str = "dict", scope: Optional[ShapeScope] = None) -> None:
        super().__init__(fields)
        self.type_name = type_name
        self._scope = scope

    def __getattr__(self, name: str) -> Any:
        if name in self:
            return self[name]
        raise AttributeError(f"{self.__dict__.get('type_name', 'dict')} shape has no part {name!r}; parts: {list(self)}")

    def __dir__(self) -> List[str]:
        return [k for k in self if isinstance(k, str)] + ["at", "subs"]

    def __repr__(self) -> str:
        return f"{self.type_name}(" + ", ".join(f"{k}={v!r}" for k, v in self.items()) + ")"

    __str__ = __repr__

    def _map(self, fn: Callable[[Any], Any]) -> "ShapeDict":
        return ShapeDict({k: _map_leaves(v, fn) for k, v in self.items()}, self.type_name, self._scope)

    def __reduce__(self) -> Any:
        return (ShapeDict, (dict(self), self.type_name))


def shape_from_meta(meta: Any, scope: Optional[ShapeScope] = None) -> Any:
    """The ``_shape`` of a value recorded as ``meta`` (see the module docstring)."""
    if not isinstance(meta, dict) or not meta:
        return None
    if "shape" in meta:
        dims = meta["shape"]
        if not isinstance(dims, list):
            return None
        if all(type(d) is int for d in dims):
            return torch.Size(dims)
        return SymbolicShape(dims, scope)
    if isinstance(meta.get("items"), list):
        return ShapeTuple([_part_shape(m, scope) for m in meta["items"]], str(meta.get("type", "tuple")), scope)
    if isinstance(meta.get("fields"), dict):
        return ShapeDict({k: _part_shape(m, scope) for k, m in meta["fields"].items()},
                         str(meta.get("type", "dict")), scope)
    return str(meta["type"]) if "type" in meta else None


def _part_shape(meta: Any, scope: Optional[ShapeScope]) -> Any:
    # inside a structure, a None part is recorded as {}: show it as graphpatch does
    shape = shape_from_meta(meta, scope)
    return "NoneType" if shape is None and meta == {} else shape


def describe_meta(meta: Dict[str, Any], names: Optional[Dict[str, str]] = None) -> str:
    """A value's recorded structure as one line: ``Tensor(float32)[1, seq, 768]``,
    ``tuple(...)``; symbolic sizes by their ``names`` (``{symbol: name}``)."""
    names = names or {}
    if "shape" in meta:
        dims = ", ".join(render(d, names) if isinstance(d, str) else str(d) for d in meta["shape"])
        return f"Tensor({meta.get('dtype', '?')})[{dims}]"
    if "items" in meta:
        return f"{meta.get('type', 'tuple')}(" + ", ".join(describe_meta(m, names) for m in meta["items"]) + ")"
    if "fields" in meta:
        fields = ", ".join(f"{k}={describe_meta(m, names)}" for k, m in meta["fields"].items())
        return f"{meta.get('type', 'dict')}({fields})"
    return str(meta.get("type", ""))


def scope_of(graph: ModuleGraph, binder: Optional[InputBinder], why: str) -> ShapeScope:
    """The shape scope of a graph's inputs (their recorded shapes); ``why`` says why a
    concrete size is unknown when there is no ``binder``."""
    shapes = []
    for nd in graph.nodes:
        if nd.op == "placeholder":
            shape = nd.meta.get("shape") if isinstance(nd.meta, dict) else None
            shapes.append((nd.name, shape if isinstance(shape, list) else None))
    return ShapeScope(shapes, binder, "" if binder is not None else why)


__all__ = ["ShapeDict", "ShapeScope", "ShapeTuple", "SymbolicShape", "SymbolicSize", "describe_meta", "scope_of",
           "shape_from_meta"]
