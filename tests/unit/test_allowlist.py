"""The closed allowlist (cache_schema/allowlist-v1.json): exact names in, everything else out."""

import json
import math
import operator
import pickle
import sys
from importlib import resources

import pytest
import torch
import torch.nn.functional as F

from graphpatch_cache import _compat, register_target
from graphpatch_cache.trust.allowlist import ATTRIBUTES, FUNCTIONS, METHODS, check_method, resolve_function, target_name
from graphpatch_cache.errors import DisallowedTargetError, GraphPatchCacheError, NodePathError, PatchError


@pytest.mark.parametrize(
    "fn",
    [torch.add, torch.tanh, torch.cat, F.linear, F.scaled_dot_product_attention, F.softmax, F.embedding,
     operator.getitem, operator.mul, math.sqrt, getattr, torch.Size],
)
def test_round_trip(fn):
    assert resolve_function(target_name(fn)) is fn


@pytest.mark.parametrize(
    "name",
    ["os.system", "subprocess.Popen", "builtins.eval", "builtins.exec", "builtins.__import__", "builtins.open",
     "builtins.compile", "builtins.map", "builtins.filter", "builtins.sorted", "builtins.isinstance",
     "_operator.attrgetter", "_operator.methodcaller", "_operator.itemgetter", "_operator.call",
     "torch.load", "torch.save", "torch.from_file", "torch.hub.load", "torch.utils.cpp_extension.load",
     "torch.jit.load", "torch.compile", "torch.UntypedStorage", "torch.FloatStorage", "torch.set_default_dtype",
     "torch._C._set_grad_enabled", "torch.ops.aten.from_file.default", "torch.ops.aten.set_.source_Storage",
     "torch.ops.higher_order.autograd_function_apply", "torch.ops.myns.op", "torch._C._jit_pass_inline",
     "importlib.import_module", "graphpatch_cache.functions.live_attr", "torch.nn", "torch", ""],
)
def test_refused(name):
    with pytest.raises(DisallowedTargetError) as info:
        resolve_function(name, node_path="a.b")
    assert info.value.target == name
    assert info.value.node_path == "a.b"


def test_the_list_is_exact_names_that_resolve():
    """No wildcards or namespaces: every entry is one callable, and nothing on it reads files,
    runs code, takes a callable or changes global state (a reviewed deny-check on the data)."""
    data = json.loads(resources.files("graphpatch_cache.cache_schema").joinpath("allowlist-v1.json").read_text())
    assert data["format"] == "graphpatch-cache-allowlist" and data["version"] == 1
    assert data["functions"] == sorted(set(data["functions"])) and data["methods"] == sorted(set(data["methods"]))
    banned = ("load", "save", "file", "storage", "hub", "jit", "compile", "library", "classes", "import", "eval",
              "exec", "open", "set_default", "manual_seed", "getter", "caller", "pin_memory", "share_memory",
              "register", "backward")
    banned_exact = {"call", "map", "filter", "sorted", "set_", "apply_", "map_", "map2_", "isinstance", "setattr",
                    "delattr", "vars", "globals", "locals", "type", "object", "super", "input", "print", "exit"}
    for name in data["functions"]:
        last = name.rsplit(".", 1)[-1]
        assert not name.endswith((".*", ".")) and "__" not in name, name
        assert not any(part in last for part in banned) and last not in banned_exact, name
        if not name.startswith("graphpatch_cache."):
            assert callable(resolve_function(name)), name
    for name in data["methods"]:
        assert not name.startswith("_") and hasattr(torch.Tensor, name), name
        assert not any(part in name for part in banned) and name not in banned_exact - {"type"}, name
    for name in data["attributes"]:
        assert not name.startswith("_") and not callable(getattr(torch.ones(2, 2, dtype=torch.complex64), name)), name
    assert set(data["functions"]) == FUNCTIONS and set(data["methods"]) == METHODS
    assert set(data["attributes"]) == ATTRIBUTES


def test_registered_functions():
    def my_helper(x):
        return x + 1

    with pytest.raises(DisallowedTargetError):
        target_name(my_helper)
    register_target(my_helper, name="tests.my_helper")
    assert target_name(my_helper) == "tests.my_helper"
    assert resolve_function("tests.my_helper") is my_helper
    for bad in ("tests.__evil__", "os; import x", "torch.add"):
        with pytest.raises(DisallowedTargetError):
            register_target(my_helper, name=bad)
    assert resolve_function("torch.add") is torch.add


def test_methods():
    assert check_method("view") == "view"
    for bad in ["storage", "untyped_storage", "register_hook", "set_", "apply_", "map_", "backward", "_private",
                "not_a_method", "__class__", "__reduce_ex__", "__setattr__"]:
        with pytest.raises(DisallowedTargetError):
            check_method(bad)


def _planted_package(tmp_path, monkeypatch, name):
    marker = tmp_path / f"{name}.ran"
    pkg = tmp_path / "planted" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nimport enum\nclass E(enum.Enum):\n    A = 1\n"
                                     "def factory():\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "planted"))
    return marker


def test_specs_never_import(tmp_path, monkeypatch):
    """torch's treespec_loads imports the module an "__enum__" context or a defaultdict node
    names; ours refuses such specs before torch sees them (a planted package never runs)."""
    marker = _planted_package(tmp_path, monkeypatch, "gpc_planted_spec")
    enum_ctx = json.dumps([{"__enum__": True, "fqn": "gpc_planted_spec:E", "name": "A"}])
    hostile = [
        json.dumps([1, {"type": "builtins.dict", "context": enum_ctx, "children_spec": [
            {"type": None, "context": None, "children_spec": []}]}]),
        json.dumps([1, {"type": "collections.defaultdict", "context": json.dumps(
            {"default_factory_module": "gpc_planted_spec", "default_factory_name": "factory", "dict_context": ["a"]}),
            "children_spec": [{"type": None, "context": None, "children_spec": []}]}]),
        json.dumps([1, {"type": "collections.deque", "context": "null", "children_spec": []}]),
        "[1, " * 200 + "]" * 200,
        "not json",
    ]
    for text in hostile:
        with pytest.raises(_compat.UnsafeSpecError):
            _compat.treespec_loads(text)
    assert not marker.exists() and "gpc_planted_spec" not in sys.modules
    # the unguarded torch loader does import it: the test above is not vacuous
    import torch.utils._pytree as pytree

    try:
        pytree.treespec_loads(hostile[0])
    except Exception:
        pass
    assert marker.exists()


def test_plain_specs_round_trip():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    value = ((torch.zeros(1),), {"a": CausalLMOutputWithPast(logits=torch.ones(1)), "b": [1, 2], "c": torch.Size([2])})
    leaves, spec = _compat.tree_flatten(value)
    again = _compat.treespec_loads(_compat.treespec_dumps(spec))
    assert again == spec


def test_cache_state_specs_round_trip_and_their_context_must_match_their_leaves():
    from graphpatch_cache.integrations.kv_cache import CacheState

    t = torch.zeros(1, 1, 3, 2)
    length = torch.zeros((), dtype=torch.uint8).expand(5)
    state = CacheState([(t, t, length, True), (t, t)], [4, 0])  # a sliding layer, a plain one
    leaves, spec = _compat.tree_flatten(state)
    again = _compat.treespec_loads(_compat.treespec_dumps(spec))
    assert again == spec and _compat.tree_unflatten(leaves, again).windows == [4, 0]
    leaf = {"type": None, "context": None, "children_spec": []}
    for context, n in (([4, 4], 6), ([-1], 2), (3, 4), ([0, 4], 4)):
        text = json.dumps([1, {"type": "graphpatch_cache.CacheState", "context": json.dumps(context),
                               "children_spec": [leaf] * n}])
        with pytest.raises(_compat.UnsafeSpecError, match="does not match its leaves"):
            _compat.treespec_loads(text)


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
