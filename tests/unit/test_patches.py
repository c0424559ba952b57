"""Unit tests of the patch classes on plain values (no graph involved)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from graphpatch_cache import AddPatch, CustomPatch, Patch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch
from graphpatch_cache.patches import number_refusal


@pytest.fixture
def x():
    return torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) + 1.0


def _snapshot(t: torch.Tensor):
    return t.clone(), t.data_ptr(), t._version


def _assert_untouched(t: torch.Tensor, snap) -> None:
    before, ptr, version = snap
    assert torch.equal(t, before)
    assert t.data_ptr() == ptr
    assert t._version == version  # no in-place op ran on it


# -- ProbePatch / RecordPatch ---------------------------------------------------------------------


def test_probe_records_detached_copy_and_passes_value_through(x):
    x = x.requires_grad_()
    probe = ProbePatch()
    assert probe.activation is None
    out = probe(x)
    assert out is x
    assert torch.equal(probe.activation, x)
    assert not probe.activation.requires_grad
    assert probe.activation.data_ptr() != x.data_ptr()
    with torch.no_grad():
        x.add_(100.0)
    assert not torch.equal(probe.activation, x)  # a copy, not a view


def test_probe_keeps_last_value_and_non_tensors(x):
    probe = ProbePatch()
    probe(x)
    probe(x * 2)
    assert torch.equal(probe.activation, x * 2)
    assert probe(7) == 7 and probe.activation == 7


def test_record_keeps_every_value(x):
    rec = RecordPatch()
    assert rec.activations == []
    for i in range(3):
        assert rec(x + i) is not None
    rec(5)
    assert len(rec.activations) == 4
    for i in range(3):
        assert torch.equal(rec.activations[i], x + i)
    assert rec.activations[3] == 5
    x.add_(1.0)
    assert torch.equal(rec.activations[0], x - 1)  # copies


def test_separate_instances_do_not_share_state(x):
    a, b = RecordPatch(), RecordPatch()
    a(x)
    assert b.activations == []


# -- ZeroPatch ------------------------------------------------------------------------------------


def test_zero_whole(x):
    snap = _snapshot(x)
    out = ZeroPatch()(x)
    assert torch.equal(out, torch.zeros_like(x))
    assert out.dtype == x.dtype and out.shape == x.shape
    _assert_untouched(x, snap)


@pytest.mark.parametrize("index", [0, (slice(None), 1), (..., slice(0, 2)), (1, 2, 3)])
def test_zero_slice(x, index):
    snap = _snapshot(x)
    out = ZeroPatch(slice=index)(x)
    expected = x.clone()
    expected[index] = 0
    assert torch.equal(out, expected)
    _assert_untouched(x, snap)


def test_zero_non_tensor():
    assert ZeroPatch()(5) == 0
    assert ZeroPatch()(2.5) == 0.0


# -- AddPatch ---------------------------------------------------------------------------------------


def test_add_whole_scalar_and_tensor(x):
    snap = _snapshot(x)
    assert torch.equal(AddPatch(value=1.5)(x), x + 1.5)
    delta = torch.randn(4)
    assert torch.equal(AddPatch(value=delta)(x), x + delta)
    _assert_untouched(x, snap)


def test_add_slice(x):
    snap = _snapshot(x)
    out = AddPatch(value=10.0, slice=(slice(None), 0))(x)
    expected = x.clone()
    expected[:, 0] += 10.0
    assert torch.equal(out, expected)
    _assert_untouched(x, snap)


def test_add_non_tensor():
    assert AddPatch(value=3)(4) == 7


def test_add_gradient_flows_to_value(x):
    delta = torch.zeros(4, requires_grad=True)
    AddPatch(value=delta, slice=(0, 0))(x).sum().backward()
    assert torch.equal(delta.grad, torch.ones(4))


# -- ReplacePatch -----------------------------------------------------------------------------------


def test_replace_whole(x):
    snap = _snapshot(x)
    new = torch.full_like(x, 3.0)
    assert torch.equal(ReplacePatch(value=new)(x), new)
    _assert_untouched(x, snap)


def test_replace_whole_shape_mismatch_raises(x):
    with pytest.raises(ValueError, match="shape"):
        ReplacePatch(value=torch.zeros(3))(x)


@pytest.mark.parametrize(
    "index,value",
    [((slice(None), 1), torch.full((2, 4), -1.0)), (0, 7.0), ((..., 0), torch.tensor(2, dtype=torch.int64))],
)
def test_replace_slice(x, index, value):
    snap = _snapshot(x)
    value_snap = value.clone() if isinstance(value, torch.Tensor) else value
    out = ReplacePatch(value=value, slice=index)(x)
    expected = x.clone()
    expected[index] = value
    assert torch.equal(out, expected)
    assert out.dtype == x.dtype
    _assert_untouched(x, snap)
    if isinstance(value, torch.Tensor):
        assert torch.equal(value, value_snap)


def test_replace_gradient_flows_to_value(x):
    value = torch.ones(2, 4, requires_grad=True)
    (ReplacePatch(value=value, slice=(slice(None), 2))(x) * 3).sum().backward()
    assert torch.equal(value.grad, torch.full((2, 4), 3.0))


# -- CustomPatch and user subclasses ----------------------------------------------------------------


def test_custom_patch(x):
    seen = []
    patch = CustomPatch(custom_op=lambda v: (seen.append(v.shape), v * 2)[1])
    snap = _snapshot(x)
    assert torch.equal(patch(x), x * 2)
    assert seen == [x.shape]
    _assert_untouched(x, snap)


def test_user_dataclass_subclass(x):
    @dataclass(kw_only=True)
    class ScalePatch(Patch):
        factor: float = 2.0

        def apply(self, value):
            return value * self.factor

    snap = _snapshot(x)
    patch = ScalePatch(factor=0.5)
    assert isinstance(patch, Patch)
    assert torch.equal(patch(x), x * 0.5)
    assert torch.equal(ScalePatch()(x), x * 2)
    _assert_untouched(x, snap)


def test_user_plain_subclass(x):
    class ClampPatch(Patch):
        def apply(self, value):
            return value.clamp(max=5.0)

    assert torch.equal(ClampPatch()(x), x.clamp(max=5.0))


def test_patch_base_is_abstract(x):
    with pytest.raises(NotImplementedError):
        Patch()(x)


@pytest.mark.parametrize(
    "make",
    [
        ProbePatch,
        RecordPatch,
        ZeroPatch,
        lambda: ZeroPatch(slice=(0, slice(1, 3))),
        lambda: AddPatch(value=1.0),
        lambda: AddPatch(value=1.0, slice=(..., 2)),
        lambda: ReplacePatch(value=torch.zeros(2, 3, 4)),
        lambda: ReplacePatch(value=0.0, slice=1),
        lambda: CustomPatch(custom_op=lambda v: v + 1),
    ],
)
def test_patches_never_mutate_input(x, make):
    x = x.requires_grad_()
    snap = _snapshot(x)
    out = make()(x)
    _assert_untouched(x, snap)
    # Writing to the result does not reach the input either (unless the patch passes it through).
    if out is not x:
        out.detach().add_(1.0)
        _assert_untouched(x, snap)


# -- which patches may apply to a Python-number node (checked when pg.patch is entered) -----------


@dataclass(kw_only=True)
class _OwnZero(ZeroPatch):
    def op(self, value):
        return value


@pytest.mark.parametrize("kind, patch, allowed", [
    ("int", ProbePatch(), True), ("int", RecordPatch(), True), ("int", CustomPatch(custom_op=abs), True),
    ("int", _OwnZero(), True), ("int", ReplacePatch(value=3), True), ("int", AddPatch(value=-1), True),
    ("SymInt", ReplacePatch(value=3), True), ("float", AddPatch(value=0.5), True),
    ("int", ReplacePatch(value=None), True), ("int", ReplacePatch(value="a string"), True),
    ("int", ZeroPatch(), False), ("bool", ZeroPatch(), False), ("int", ReplacePatch(value=torch.tensor(3)), False),
    ("int", AddPatch(value=torch.ones(1)), False), ("float", ReplacePatch(value=[torch.ones(1)]), False),
    ("int", ReplacePatch(value=1, slice=0), False), ("int", AddPatch(value=1, slice=[0]), False),
])
def test_number_refusal(kind, patch, allowed):
    why = number_refusal(patch, kind)
    assert (why is None) == allowed, why
    if not allowed:
        assert type(patch).__name__ in why


# -- dtype and device of a patched tensor ---------------------------------------------------------
def test_a_patch_changing_a_parts_dtype_is_refused_naming_the_part(x):
    from graphpatch_cache.errors import PatchError
    from graphpatch_cache.runtime.slots import apply_patches

    value = (x.clone(), {"logits": x.clone()})
    with pytest.raises(PatchError, match=r"CustomPatch at node 'output\|sub_1\|logits' turned its torch.float32 "
                                         r"value into a torch.float64 one") as info:
        apply_patches(value, [CustomPatch(custom_op=lambda v: v.double())], (1, "logits"), "output")
    assert info.value.node_path == "output" and "value.to(torch.float32)" in str(info.value)
    # the same dtype goes through, and AddPatch casts a float64 value's sum back, as graphpatch's += does
    delta = torch.full((4,), 0.5, dtype=torch.float64)
    out = apply_patches(value, [AddPatch(value=delta)], (1, "logits"), "output")
    assert out[1]["logits"].dtype == torch.float32 and torch.equal(out[1]["logits"], x + delta.float())
    assert torch.equal(out[0], x)
