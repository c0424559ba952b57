"""Which symbols (sizes) a graph serves at 1 as well, from a trace's guards: the rule of
``extraction/sizes.py`` on hand-written guards. No trace.

Oracle: the guards evaluated by hand at the points each case names (batch 1, length 1, both,
and 2 or 3 for a size traced at 1)."""

import sympy

from graphpatch_cache.extraction.sizes import _Checker, _neutral_symbol, _shared_symbols

b, m, s, t = sympy.symbols("b m s t", integer=True, positive=True)  # ids batch, mask batch, lengths
HINTS = {b: 2, m: 2, s: 8, t: 8}


def _shared(guards, hints=HINTS, ranges=None):
    facts = ([(g, None) for g in guards], lambda e: e, hints, ranges or {})
    return _shared_symbols(set(hints), facts)


def test_no_guards_every_size_is_shared():
    assert _shared([]) == {b, m, s, t}


def test_a_branch_on_length_one_keeps_the_length_apart():
    assert _shared([s > 1]) == {b, m}


def test_sizes_that_move_together_are_judged_together():
    # gpt2's mask.view(batch, -1) then attention: (t * m) // b == s holds when b and m are 1
    # together, not when only one of them is
    assert _shared([sympy.Eq((t * m) // b, s), s > 1, sympy.Eq(t, s)]) == {b, m}


def test_a_guard_failing_only_when_both_are_one_refuses_the_second_group():
    # batch 1 alone and length 1 alone pass; both at once do not: the later group is refused
    assert _shared([sympy.Ne(b * s, 1)], hints={b: 2, s: 8}) == {b}


def test_ranges_count_like_guards():
    assert _shared([], hints={b: 2, s: 8}, ranges={s: (2, None)}) == {b}


def test_a_size_traced_at_one_serves_larger_sizes_only_where_the_guards_allow():
    hints = {b: 1, s: 8}
    assert _shared([], hints=hints) == {b, s}
    assert _shared([sympy.Eq(b, 1)], hints=hints) == {s}
    assert _shared([sympy.Ne(b, 2)], hints=hints) == {s}  # tested at 2 and 3


def test_a_guard_with_a_symbol_without_example_value_refuses():
    u = sympy.Symbol("u0", integer=True)  # a data-dependent size
    assert _shared([sympy.Eq(u, b)]) == {s, t}  # (m: the same group as b, equal example sizes)


def test_a_neutral_guard_is_skipped_at_size_one_only():
    checker = _Checker([(sympy.Ne(b, 1), True)], lambda e: e, HINTS, {})
    assert checker.holds({b: 1}) and checker.holds({b: 3})
    strict = _Checker([(sympy.Ne(b, 1), False)], lambda e: e, HINTS, {})
    assert not strict.holds({b: 1})
    # only the form Ne(symbol, 1) is neutral: a guard that the branch was not taken is kept
    assert _neutral_symbol(sympy.Ne(b, 1)) == b and _neutral_symbol(sympy.Eq(b, 1)) is None
    assert _neutral_symbol(sympy.Ne(b, 2)) is None and _neutral_symbol(sympy.Ne(b * s, 1)) is None


def test_a_call_shape_says_where_size_one_is_served():
    import json

    from graphpatch_cache.cache import describe_call_shape

    spec = [1, {"type": "builtins.tuple", "context": "null", "children_spec": [
        {"type": "builtins.tuple", "context": "null", "children_spec": []},
        {"type": "builtins.dict", "context": '["input_ids"]', "children_spec": [
            {"type": None, "context": None, "children_spec": []}]}]}]
    leaf = {"kind": "tensor", "dtype": "int64", "device": "cpu", "dims": ["dyn1", "dyn"]}
    text = describe_call_shape({"spec": json.dumps(spec), "leaves": [leaf]})
    assert text.startswith("input_ids[b>=1,s] int64")
