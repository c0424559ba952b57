"""What code written for graphpatch 0.2.3 needs from us (issue 10, "Compatibility"), the parts
that need no graph: its patch override point and dataclass style, list-form slices, patch
shapes and dtypes, its ExtractionOptions fields, and the ``graphpatch_cache.compat.graphpatch``
import module (on graphs: tests/integration/test_graphpatch_compat.py)."""

from __future__ import annotations

import copy
import typing
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from graphpatch_cache import (
    AddPatch,
    ExtractionOptions,
    Patch,
    ReplacePatch,
    ZeroPatch,
)
from graphpatch_cache.errors import NoEquivalentError


# -- Patch: op and apply, generic, dataclass subclasses -------------------------------------------------------


@dataclass(kw_only=True)
class ScalePatch(Patch[torch.Tensor]):
    """graphpatch's documented way to write a patch: a keyword-only dataclass overriding op."""

    scale: float

    def op(self, original_output):
        return original_output * self.scale


def test_patch_is_generic():
    assert typing.get_args(Patch[torch.Tensor]) == (torch.Tensor,)
    assert isinstance(ScalePatch(scale=1.0), Patch)
    assert typing.Generic in Patch.__mro__
    with pytest.raises(TypeError):  # keyword-only, as in graphpatch
        ScalePatch(2.0)


def test_op_and_apply_precedence():
    x = torch.arange(6.0).reshape(2, 3)

    @dataclass(kw_only=True)
    class ApplyOnly(Patch):
        def apply(self, value):
            return value + 1

    class OpBelowApply(ApplyOnly):  # the most derived definition wins: op
        def op(self, value):
            return value * 10

    class Both(Patch):  # one class defining both: apply runs (and may call op)
        def apply(self, value):
            return self.op(value) + 0.5

        def op(self, value):
            return -value

    class DoubledZero(ZeroPatch):  # overriding a built-in's op replaces it; super() reaches it
        def op(self, value):
            return super().op(value) + 2

    class ApplyOverBuiltin(AddPatch):  # ours: apply; super().apply reaches the built-in op
        def apply(self, value):
            return super().apply(value) * 2

    assert torch.equal(ApplyOnly()(x), x + 1)
    assert torch.equal(ApplyOnly().op(x), x + 1)  # op falls through to an overridden apply
    assert torch.equal(OpBelowApply()(x), x * 10)
    assert torch.equal(Both()(x), -x + 0.5)
    assert torch.equal(DoubledZero(slice=(0,))(x), torch.tensor([[2.0, 2, 2], [5, 6, 7]]))
    assert torch.equal(ApplyOverBuiltin(value=1.0)(x), (x + 1) * 2)
    assert torch.equal(ScalePatch(scale=2.0).apply(x), x * 2)  # apply falls through to op


def test_patch_overriding_neither_is_refused_at_construction():
    """graphpatch's base op passes the value through; a patch that overrides nothing is a
    mistake we refuse when it is made, not a silent no-op."""
    with pytest.raises(NotImplementedError, match="neither op.*nor apply"):
        Patch()

    class Nothing(Patch):
        pass

    class Something(Nothing):  # an intermediate base class may define neither
        def op(self, value):
            return value + 1

    with pytest.raises(NotImplementedError, match="Nothing"):
        Nothing()
    assert torch.equal(Something()(torch.ones(2)), torch.full((2,), 2.0))
    assert torch.equal(copy.deepcopy(Something(requires_clone=False)).op(torch.ones(1)), torch.full((1,), 2.0))


# -- list-form slices --------------------------------------------------------------------------------------------


def test_list_slices_mean_what_they_meant_in_graphpatch():
    x = torch.arange(12.0).reshape(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torch deprecation warning about sequence indexing
        zeroed = ZeroPatch(slice=[slice(None), 0])(x)
        added = AddPatch(value=1.0, slice=[0, slice(1, 3)])(x)
        replaced = ReplacePatch(value=7.0, slice=[..., 1])(x)
        rows = ZeroPatch(slice=[0, 2])(x)  # a list of ints: rows 0 and 2 (advanced indexing)
    expected = x.clone()
    expected[:, 0] = 0
    assert torch.equal(zeroed, expected)
    expected = x.clone()
    expected[0, 1:3] += 1
    assert torch.equal(added, expected)
    expected = x.clone()
    expected[..., 1] = 7
    assert torch.equal(replaced, expected)
    expected = x.clone()
    expected[[0, 2]] = 0
    assert torch.equal(rows, expected)


def test_replace_and_add_keep_the_nodes_shape_and_dtype():
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(ReplacePatch(value=4)(x), torch.full((2, 3), 4.0))  # graphpatch: fills
    row = torch.tensor([1, 2, 3], dtype=torch.float64)
    out = ReplacePatch(value=row)(x)  # broadcasts, keeps float32
    assert out.dtype == torch.float32 and torch.equal(out, row.float().expand(2, 3))
    with pytest.raises(ValueError, match="broadcast"):
        ReplacePatch(value=torch.zeros(4))(x)
    out = AddPatch(value=torch.ones(3, dtype=torch.float64))(x)
    assert out.dtype == torch.float32 and torch.equal(out, x + 1)
    with pytest.raises(ValueError, match="shape"):
        AddPatch(value=torch.ones(4, 2, 3))(x)


def test_copy_generation_config_option_is_not_in_the_key():
    options = ExtractionOptions(copy_transformers_generation_config=False)
    assert ExtractionOptions().copy_transformers_generation_config is True
    assert "copy_transformers_generation_config" not in options.fingerprint()
    assert options.fingerprint() == ExtractionOptions().fingerprint()


def test_options_accept_graphpatch_field_types():
    options = ExtractionOptions(classes_to_skip_compiling={nn.ReLU, nn.GELU}, skip_compilation=False)
    assert set(options.classes_to_skip_compiling) == {nn.ReLU, nn.GELU}


# -- the compat module -------------------------------------------------------------------------------------------


#: graphpatch 0.2.3's ``graphpatch.__all__`` (from its documented API)
GRAPHPATCH_NAMES = {
    "AddPatch", "CompiledGraphModule", "CustomPatch", "MultiplyInvokedModule", "OpaqueGraphModule", "Patch",
    "ProbePatch", "RecordPatch", "ReplacePatch", "ZeroPatch", "ExtractionOptions", "PatchableGraph",
}


def test_compat_module_has_graphpatchs_names():
    import graphpatch_cache
    from graphpatch_cache.compat import graphpatch as gp

    assert set(gp.__all__) == GRAPHPATCH_NAMES
    for name in GRAPHPATCH_NAMES - {"CompiledGraphModule", "OpaqueGraphModule", "MultiplyInvokedModule"}:
        assert getattr(gp, name) is getattr(graphpatch_cache, name)  # the same classes, not wrappers
    namespace: dict = {}
    exec("from graphpatch_cache.compat.graphpatch import *", namespace)
    assert GRAPHPATCH_NAMES <= set(namespace)


@pytest.mark.parametrize("name", ["CompiledGraphModule", "OpaqueGraphModule", "MultiplyInvokedModule"])
def test_compat_names_without_equivalent_refuse_every_use(name):
    from graphpatch_cache.compat import graphpatch as gp

    cls = getattr(gp, name)
    for use in (lambda: isinstance(nn.Linear(1, 1), cls), lambda: issubclass(nn.Linear, cls), lambda: cls()):
        with pytest.raises(NoEquivalentError, match=name) as info:
            use()
        assert isinstance(info.value, NotImplementedError) and info.value.name == name
        assert "pg.artifact.root.walk()" in str(info.value)
