"""The opaque router's input binding without a trace: every call form binds as canonical inputs
does (opaque graphs: tests/integration/test_opaque.py)."""


import pytest
import torch


def test_input_binder_binds_every_call_form_as_canonical_inputs_does():
    # the opaque router's memoized binding: same result as a fresh bind, for every call form
    # (positional, keyword, *args, **kwargs, defaults left out), across repeated forms
    from graphpatch_cache.live.inputs import InputBinder, canonical_inputs

    class Forms(torch.nn.Module):
        def forward(self, x, y=None, *rest, scale=1.0, **extra):
            return x

    class Plain(torch.nn.Module):
        def forward(self, x, y=None, scale=1.0):
            return x

    a, b, c, d = (torch.randn(2) for _ in range(4))
    for module in (Forms(), Plain()):
        binder = InputBinder(module)
        calls = [((a,), {}), ((a, b), {}), ((), {"x": a, "y": b}), ((a,), {"scale": 2.0}),
                 ((), {"scale": 3.0, "x": a}), ((a, b), {"scale": 2.0})]
        if isinstance(module, Forms):
            calls += [((a, b, c, d), {}), ((a, b, c), {"scale": 2.0, "z": d}), ((a,), {"w": c})]
        for args, kwargs in calls * 2:  # the second round takes the memoized plans
            got, want = binder(args, kwargs), canonical_inputs(module, args, kwargs)
            assert len(got[0]) == len(want[0]) and all(g is w for g, w in zip(got[0], want[0]))
            assert list(got[1]) == list(want[1])
            assert all(got[1][k] is want[1][k] for k in want[1])
        with pytest.raises(TypeError, match="does not accept"):
            binder((a, b, c, d, a), {"q": 1}) if isinstance(module, Plain) else binder((), {})
