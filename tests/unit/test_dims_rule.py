"""The one dimension fit rule (``artifact.signature.dims_rule``) and its two users: the
per-call matcher on live tensors and the stored-signature comparison. No trace.

Oracle: the rule as the artifact spec states it, written out case by case (same rank; a
fixed dimension takes exactly its size; a symbolic one any size >= 2 ("dyn": the model's code
branches on size 1 there, or dynamo specialized 0 and 1) or >= 1 ("dyn1"); never 0).
"""

import pytest
import torch

from graphpatch_cache import _compat
from graphpatch_cache.artifact.model import check_schema_version
from graphpatch_cache.artifact.signature import SignatureMatcher, _leaf_fits, dims_rule
from graphpatch_cache.errors import GraphPatchCacheError

CASES = [
    ([], [], True),
    ([3], [3], True),
    ([3], [4], False),
    ([3], [3, 1], False),
    (["dyn"], [2], True),
    (["dyn"], [7], True),
    (["dyn"], [1], False),
    (["dyn"], [0], False),
    ([1, "dyn"], [1, 5], True),
    ([1, "dyn"], [2, 5], False),
    ([1, "dyn"], [1, 1], False),
    (["dyn", "dyn", 4], [2, 3, 4], True),
    (["dyn", "dyn", 4], [2, 3, 5], False),
    (["dyn", 4], [2, 3, 4], False),
    (["dyn1"], [1], True),
    (["dyn1"], [2], True),
    (["dyn1"], [9], True),
    (["dyn1"], [0], False),
    (["dyn1", "dyn"], [1, 2], True),
    (["dyn1", "dyn"], [1, 1], False),
    (["dyn1", 4], [1, 5], False),
    (["dyn1", 4], [3, 4], True),
]


@pytest.mark.parametrize("want,sizes,expected", CASES)
def test_rule_on_shapes(want, sizes, expected):
    assert dims_rule(want)(torch.Size(sizes)) is expected
    assert dims_rule(want)(tuple(sizes)) is expected


@pytest.mark.parametrize("want,sizes,expected", CASES)
def test_stored_and_live_comparisons_agree(want, sizes, expected):
    stored = {"kind": "tensor", "dtype": "float32", "dims": want, "device": "cpu"}
    assert _leaf_fits(stored, {"kind": "tensor", "dtype": "float32", "dims": sizes, "device": "cpu"}) is expected
    x = torch.zeros(sizes)
    leaves, spec = _compat.tree_flatten(((x,), {}))
    matcher = SignatureMatcher({"spec": _compat.treespec_dumps(spec), "leaves": [stored]})
    assert matcher.fits(leaves, spec) is expected
    # another dtype never fits
    y = torch.zeros(sizes, dtype=torch.float64)
    assert matcher.fits([y], spec) is False


def test_schema_version_check():
    assert check_schema_version({"schema_version": 1}) == 1
    with pytest.raises(GraphPatchCacheError, match="no schema_version"):
        check_schema_version({"hello": 1})
    with pytest.raises(GraphPatchCacheError, match=r"schema_version 99 .*\[1\]"):
        check_schema_version({"schema_version": 99})
