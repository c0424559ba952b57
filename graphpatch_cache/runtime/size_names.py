"""Names for symbolic sizes, for display: ``s52`` is ``batch``, ``s27 + s53`` is ``past + seq``.

dynamo names each dimension it traces symbolically ``s<N>`` (and ``u<N>`` for sizes a graph
computes). The numbers say nothing to a reader, so the node tree and ``_shape`` show a name
derived from the root graph's inputs, where the symbol is first a plain dimension:

- ``input_ids`` / ``inputs_embeds``: dim 0 is ``batch``, dim 1 is ``seq``;
- ``decoder_input_ids`` / ``decoder_inputs_embeds``: dim 1 is ``decoder_seq`` (dim 0
  ``batch`` where it is its own symbol and ``batch`` is free);
- a key/value cache's tensors (``<cache>_layer<i>_keys``/``_values``, rank 4): the length
  dim (``-2``) of layer 0's keys is ``past`` (what ``get_seq_length()`` reads); dynamo gives
  every other cache tensor's length its own symbol, named ``past_k<i>`` / ``past_v<i>``.

Any other symbol keeps its own text (``s92``), and the tree's header line says which input
dimension it is. Names are display only: a :class:`~.shapes.SymbolicSize` still equals its
symbol's text, and ``.subs`` takes symbols or names.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

_TOKENS = ("input_ids", "inputs_embeds")
_DECODER_TOKENS = ("decoder_input_ids", "decoder_inputs_embeds")
_CACHE = re.compile(r"(?:^|_)layer(\d+)_(keys|values)$")
_IDENT = re.compile(r"[A-Za-z_]\w*")


def size_names(placeholders: Sequence[Tuple[str, Optional[Sequence[Any]]]]) -> Dict[str, str]:
    """``{symbol: name}`` for the symbols of a root graph's inputs (``(name, shape)`` in
    order) that the rules in the module docstring name; each name is used once."""
    names: Dict[str, str] = {}

    def give(dim: Any, name: str) -> None:
        if isinstance(dim, str) and dim.isidentifier() and dim not in names and name not in names.values():
            names[dim] = name

    shapes = [(n, list(s)) for n, s in placeholders if s is not None]
    for wanted, labels in ((_TOKENS, ("batch", "seq")), (_DECODER_TOKENS, ("batch", "decoder_seq"))):
        for name, shape in shapes:
            if name in wanted:
                for dim, label in zip(shape, labels):
                    give(dim, label)
    caches = [(int(m.group(1)), m.group(2), shape) for name, shape in shapes
              if (m := _CACHE.search(name)) is not None and "cross_" not in name and len(shape) == 4]
    for layer, kind, shape in sorted(caches, key=lambda c: (c[0], c[1] != "keys")):
        give(shape[2], "past" if (layer, kind) == (0, "keys") else f"past_{kind[0]}{layer}")
    return names


def render(text: str, names: Dict[str, str]) -> str:
    """``text`` (a size expression) with its symbols replaced by their names; a plain sum
    lists ``past`` names first, so a cached call's length reads ``past + seq``."""
    if not names:
        return text
    if text in names:
        return names[text]
    terms = _sum_terms(text)
    if terms is not None and any(t in names for t in terms):
        named = [names.get(t, t) for t in terms]
        order = sorted(range(len(named)), key=lambda i: (not terms[i].isidentifier(),
                                                         not named[i].startswith("past"), i))
        return " + ".join(named[i] for i in order)
    return _IDENT.sub(lambda m: names.get(m.group(0), m.group(0)), text)


def _sum_terms(text: str) -> Optional[List[str]]:
    """The terms of ``a + b + 1`` (symbols and non-negative int constants), else None."""
    if len(text) > 200:
        return None
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    terms: List[str] = []

    def walk(nd: ast.AST) -> bool:
        if isinstance(nd, ast.BinOp) and isinstance(nd.op, ast.Add):
            return walk(nd.left) and walk(nd.right)
        if isinstance(nd, ast.Name):
            terms.append(nd.id)
            return True
        if isinstance(nd, ast.Constant) and type(nd.value) is int and nd.value >= 0:
            terms.append(str(nd.value))
            return True
        return False

    return terms if walk(tree) and len(terms) > 1 else None


def legend(symbols: Iterable[str], names: Dict[str, str], sources: Dict[str, Tuple[int, str, int]]) -> str:
    """One line saying what each of ``symbols`` is: ``batch = input_ids.shape[0] (s52)``;
    a symbol without a name is shown by its text (``s92 = attention_mask.shape[0]``), one no
    input gives (a size the graph computes) as ``u0: computed``."""
    parts = []
    for sym in symbols:
        shown = names.get(sym, sym)
        where = f"{sources[sym][1]}.shape[{sources[sym][2]}]" if sym in sources else ""
        if where:
            parts.append(f"{shown} = {where}" + (f" ({sym})" if shown != sym else ""))
        else:
            parts.append(f"{shown}: computed in the graph" + (f" ({sym})" if shown != sym else ""))
    return "sizes: " + ", ".join(parts) if parts else ""


def legend_for(scope: Any, metas: Iterable[Any]) -> str:
    """:func:`legend` of the symbols the recorded values ``metas`` use, by the names and
    sources of ``scope`` (a :class:`~.shapes.ShapeScope`, or None: no line): a tree's header."""
    if scope is None:
        return ""
    used: Dict[str, None] = {}
    for meta in metas:
        meta_symbols(meta, used)
    return legend(used, scope.names, scope.sources)


def meta_symbols(meta: Any, out: Dict[str, None]) -> None:
    """Add the symbols a value's recorded shapes use to ``out`` (in order of first use)."""
    if not isinstance(meta, dict):
        return
    dims = meta.get("shape")
    if isinstance(dims, list):
        for dim in dims:
            if isinstance(dim, str):
                for sym in _IDENT.findall(dim):
                    if sym not in _FUNCS:
                        out.setdefault(sym, None)
    items = meta.get("items")
    for part in items if isinstance(items, list) else ():
        meta_symbols(part, out)
    fields = meta.get("fields")
    if isinstance(fields, dict):
        for part in fields.values():
            meta_symbols(part, out)


_FUNCS = frozenset({"Max", "Min", "Mod", "PythonMod", "FloorDiv"})

__all__ = ["legend", "legend_for", "meta_symbols", "render", "size_names"]
