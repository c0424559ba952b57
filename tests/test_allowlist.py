"""The call-target allowlist: torch operators in, anything that could run foreign code out."""

import math
import operator
import pickle

import pytest
import torch
import torch.nn.functional as F

from graphpatch_cache import register_target
from graphpatch_cache.errors import DisallowedTargetError, GraphPatchCacheError, NodePathError, PatchError
from graphpatch_cache.targets import check_method, qualified_name, resolve_target


@pytest.mark.parametrize(
    "fn",
    [torch.add, torch.tanh, torch.cat, F.linear, F.scaled_dot_product_attention, F.softmax, F.embedding,
     operator.getitem, operator.mul, math.sqrt, getattr, torch.ops.aten.sym_size.int, torch._C._set_grad_enabled],
)
def test_round_trip(fn):
    assert resolve_target(qualified_name(fn)) is fn


@pytest.mark.parametrize(
    "name",
    ["os.system", "subprocess.Popen", "builtins.eval", "builtins.exec", "builtins.__import__", "builtins.open",
     "torch.load", "torch.save", "torch.from_file", "torch.hub.load", "torch.utils.cpp_extension.load",
     "torch.jit.load", "torch.ops.myns.op", "torch._C._jit_pass_inline", "importlib.import_module", ""],
)
def test_refused(name):
    with pytest.raises(DisallowedTargetError) as info:
        resolve_target(name, node_path="a.b")
    assert info.value.target == name
    assert info.value.node_path == "a.b"


def test_registered_functions():
    def my_helper(x):
        return x + 1

    with pytest.raises(DisallowedTargetError):
        qualified_name(my_helper)
    register_target(my_helper, name="tests.my_helper")
    assert qualified_name(my_helper) == "tests.my_helper"
    assert resolve_target("tests.my_helper") is my_helper


def test_methods():
    assert check_method("view") == "view"
    for bad in ["storage", "_private", "not_a_method", "__class__"]:
        with pytest.raises(DisallowedTargetError):
            check_method(bad)


def test_errors_share_a_base_and_pickle():
    errors = [
        DisallowedTargetError("x", node_path="a", target="os.system"),
        NodePathError("y", node_path="a.b", suggestions=["a.c"]),
        PatchError("z", node_path="a.b", hint="fix it"),
    ]
    for err in errors:
        assert isinstance(err, GraphPatchCacheError)
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err) and again.node_path == err.node_path
    assert isinstance(errors[1], KeyError)
