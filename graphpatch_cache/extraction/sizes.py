"""Which sizes a traced graph serves, per input dimension: fixed, any size >= 2, or any size >= 1.

Dynamo normally specializes sizes 0 and 1 and traces every other size with a symbol of range
[2, inf]: a branch of the model on a size being 1 is then decided without leaving a trace,
so a graph from a batch-2 call cannot be trusted with batch 1. Extraction traces with
size-oblivious sizes instead (``_compat.dynamo_capture_config(size_oblivious=True)``): every
size gets a symbol of range [0, inf], and each branch the model takes on a size becomes a
guard, the condition under which the graph computes what the model computes. A dimension
serves size 1 when every guard still holds with its size set to 1 (and sizes >= 2, for a
dimension traced at 1). Three things keep this on the safe side:

- Sizes that move together in real calls (a batch of ``input_ids`` and of its
  ``attention_mask``) are distinct symbols, related only by guards; dimensions of equal
  example size are therefore tested together, as one group (use distinct example sizes for
  batch and sequence length to let them be judged apart).
- Groups are accepted one at a time, each tested together with every combination of the
  groups accepted before (batch 1 and length 1 at once, too).
- A dimension whose size is an expression of symbols, or a guard that cannot be evaluated
  (a symbol without an example value), serves what it did before: sizes >= 2 only.

One exception, reviewed by hand: a guard ``Ne(size, 1)`` left by a branch of transformers'
code whose path for larger sizes computes the same values at size 1
(``integrations.transformers.SIZE_ONE_NEUTRAL``) is not checked at size 1.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import sympy
import torch

from ..integrations.transformers import size_one_neutral

#: a signature dimension that serves any size >= 1 (see ``artifact.signature.dims_rule``)
SERVES_ONE = "dyn1"
#: sizes a group traced at size 1 is tested at, to serve larger sizes too
_LARGER = (2, 3)
#: at most this many points are tested for one group (groups beyond it are not widened)
_MAX_POINTS = 256

#: per input dimension: False (fixed at the example's size), True (any size >= 2; a size-1
#: example dimension stays fixed), or :data:`SERVES_ONE`
Served = Union[bool, str]


def served_dims(fakes: Sequence[Optional[torch.Tensor]], shapes: Sequence[Sequence[int]],
                facts: Optional[Any]) -> List[Optional[List[Served]]]:
    """What each dimension of each tensor input serves, from the trace's fake inputs, the
    example's sizes (``shapes``, one per fake) and ``_compat.shape_facts`` (None: a trace
    without size-oblivious sizes, where a symbol serves sizes >= 2 and a number is fixed)."""
    reps: List[Optional[List[Any]]] = []
    for fake in fakes:
        if not isinstance(fake, torch.Tensor):
            reps.append(None)
            continue
        row: List[Any] = []
        for size in fake.shape:
            expr = size.node.expr if isinstance(size, torch.SymInt) else None
            if expr is not None and facts is not None:
                expr = facts[1](expr)
            # a symbol the trace pinned to one value (a branch on ``size == 8``) is static
            row.append(None if expr is None or getattr(expr, "is_number", False) else expr)
        reps.append(row)
    symbols = {e for row in reps if row for e in row if isinstance(e, sympy.Symbol)}
    shared = _shared_symbols(symbols, facts) if facts is not None else set()
    out: List[Optional[List[Served]]] = []
    for maybe_row, shape in zip(reps, shapes):
        if maybe_row is None:
            out.append(None)
            continue
        dims: List[Served] = []
        for size, expr in zip(shape, maybe_row):
            if expr is None:
                dims.append(False)
            elif expr in shared:
                dims.append(SERVES_ONE)
            elif facts is not None and size < 2:
                dims.append(False)  # traced at 0 or 1, not shown to serve other sizes
            else:
                dims.append(True)
        out.append(dims)
    return out


def _shared_symbols(symbols: Any, facts: Any) -> set:
    guards, replace, hints, ranges = facts
    groups: Dict[int, List[sympy.Symbol]] = {}
    for s in symbols:
        if s in hints and int(hints[s]) >= 1:
            groups.setdefault(int(hints[s]), []).append(s)
    checker = _Checker([(replace(g), size_one_neutral(where)) for g, where in guards], replace, hints, ranges)
    accepted: List[Tuple[List[sympy.Symbol], Tuple[int, ...]]] = []
    for hint in sorted(groups):
        group = (sorted(groups[hint], key=str), _LARGER if hint == 1 else (1,))
        if _points(accepted) * len(group[1]) > _MAX_POINTS:
            break
        if all(checker.holds(point) for point in _combinations(accepted, group)):
            accepted.append(group)
    return {s for syms, _ in accepted for s in syms}


def _points(accepted: Sequence[Tuple[Any, Tuple[int, ...]]]) -> int:
    n = 1
    for _, alts in accepted:
        n *= 1 + len(alts)
    return n


def _combinations(accepted: Sequence[Tuple[List[sympy.Symbol], Tuple[int, ...]]],
                  group: Tuple[List[sympy.Symbol], Tuple[int, ...]]) -> List[Dict[sympy.Symbol, int]]:
    """Every point with ``group`` at one of its other sizes and each accepted group at its
    example size or one of its other sizes."""
    choices = [[None, *alts] for _, alts in accepted]
    points = []
    for values in itertools.product(*choices):
        for value in group[1]:
            point = {s: value for s in group[0]}
            for (syms, _), v in zip(accepted, values):
                if v is not None:
                    point.update({s: v for s in syms})
            points.append(point)
    return points


class _Checker:
    """Whether the trace's guards and symbol ranges hold at a point (symbols not given keep
    their example values)."""

    def __init__(self, guards: List[Tuple[Any, bool]], replace: Any, hints: Dict[Any, Any],
                 ranges: Dict[Any, Any]) -> None:
        #: (guard, the symbol of a neutral ``Ne(symbol, 1)`` guard, not checked at size 1, or None)
        self.guards = [(g, _neutral_symbol(g) if neutral else None) for g, neutral in guards if g is not sympy.true]
        self.hints = hints
        #: ranges of every symbol, as expressions of the symbols that remain after replacement
        self.ranges = [(replace(s), lo, hi) for s, (lo, hi) in ranges.items()]

    def holds(self, point: Dict[Any, int]) -> bool:
        moved = set(point)
        values = {s: sympy.Integer(v) for s, v in self.hints.items()}
        values.update({s: sympy.Integer(v) for s, v in point.items()})
        for expr, lo, hi in self.ranges:
            if not (getattr(expr, "free_symbols", set()) & moved):
                continue
            value = expr.xreplace(values)
            if not value.is_number:
                return False
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                return False
        for guard, neutral in self.guards:
            if not (guard.free_symbols & moved) or (neutral is not None and point.get(neutral) == 1):
                continue
            try:
                if guard.xreplace(values) is not sympy.true:
                    return False
            except (ArithmeticError, TypeError, ValueError):  # (a division by zero at this point)
                return False
        return True


def _neutral_symbol(guard: Any) -> Optional[sympy.Symbol]:
    """The symbol of a guard ``Ne(symbol, 1)`` (the branch for sizes other than 1 was taken)."""
    if isinstance(guard, sympy.Ne):
        sides = set(guard.args)
        if sympy.Integer(1) in sides and len(sides) == 2:
            (other,) = sides - {sympy.Integer(1)}
            return other if isinstance(other, sympy.Symbol) else None
    return None


__all__ = ["SERVES_ONE", "Served", "served_dims"]
