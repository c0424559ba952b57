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
    if any(name.startswith("torch.ops.transformers.") for name in data["functions"]):
        import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.*)
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


def test_a_listed_operator_nobody_registered_is_refused_without_importing(monkeypatch):
    """A custom operator on the list resolves through torch's dispatcher only: while no library
    registered it, loading refuses it with a typed error, and nothing is imported for it."""
    from graphpatch_cache.trust import allowlist

    name = "torch.ops.graphpatch_cache_unregistered.some_op"
    monkeypatch.setattr(allowlist, "FUNCTIONS", allowlist.FUNCTIONS | {name})
    before = set(sys.modules)
    with pytest.raises(DisallowedTargetError, match="not registered in this process") as info:
        resolve_function(name, node_path="layer.op")
    assert info.value.node_path == "layer.op" and "import the library" in str(info.value)
    assert not {m for m in set(sys.modules) - before if "unregistered" in m}


@pytest.mark.skipif(_compat.GROUPED_MM is None, reason="torch without torch._grouped_mm (< 2.8)")
def test_grouped_mm_bounds_the_offsets_torch_trusts():
    """Graphs call torch._grouped_mm through graphpatch_cache.functions.grouped_mm: the same
    values for valid offsets; offsets past the rows or decreasing are bounded first, and a
    wrong number of groups is a typed error (torch's kernels would read outside the operands)."""
    from graphpatch_cache.errors import ShapeError

    grouped_mm = resolve_function("graphpatch_cache.functions.grouped_mm")
    assert "torch._grouped_mm" not in FUNCTIONS
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 16, generator=g).bfloat16()
    b = torch.randn(3, 16, 8, generator=g).bfloat16()
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)
    assert torch.equal(grouped_mm(a, b, offs=offs), torch._grouped_mm(a, b, offs=offs))
    for bad, bounded in [([2, 100, 7], [2, 6, 6]), ([5, 1, 6], [5, 5, 6]), ([-4, 3, 6], [0, 3, 6])]:
        got = grouped_mm(a, b, offs=torch.tensor(bad, dtype=torch.int32))
        assert torch.equal(got, torch._grouped_mm(a, b, offs=torch.tensor(bounded, dtype=torch.int32))), bad
    with pytest.raises(ShapeError, match="one offset per group"):
        grouped_mm(a, b, offs=torch.tensor([2, 4, 5, 6], dtype=torch.int32))


def test_histc_counts_integers_on_cpu():
    """Graphs call torch.histc through graphpatch_cache.functions.histc: a graph traced where
    transformers counts integers (CUDA, the meta device) runs on CPU, which has no integer
    kernel, with the values and dtype torch gives elsewhere."""
    histc = resolve_function("graphpatch_cache.functions.histc")
    assert "torch.histc" not in FUNCTIONS
    ids = torch.tensor([0, 1, 1, 3, 3, 3], dtype=torch.int32)
    with pytest.raises(NotImplementedError):
        torch.histc(ids, bins=4, min=0, max=3)
    got = histc(ids, bins=4, min=0, max=3)
    assert got.dtype == torch.int32 and got.tolist() == [1, 2, 0, 3]
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(histc(x, 7, -1, 1), torch.histc(x, 7, -1, 1))


class _Plain(torch.nn.Module):
    def forward(self, x):
        return x


def _calling(target: str, args: list):
    """A hand-built artifact whose graph returns ``target(*args)`` (``{"n": "x"}``: its input)."""
    import dataclasses

    from graphpatch_cache.artifact import NodeData
    from graphpatch_cache.live.structure import structure
    from hand_built import scaling_artifact

    model = _Plain()
    artifact = scaling_artifact(model_class=f"{_Plain.__module__}.{_Plain.__qualname__}")
    nodes = [artifact.root.nodes[0],
             NodeData(name="called", op="call_function", target=target, args={"t": args}, kwargs={"d": []},
                      meta=dict(artifact.root.nodes[1].meta)),
             dataclasses.replace(artifact.root.nodes[2], args={"t": [{"n": "called"}]})]
    extraction = {**artifact.extraction, "structure": structure(model)}
    return dataclasses.replace(artifact, root=dataclasses.replace(artifact.root, nodes=nodes), extraction=extraction), model


def test_a_reviewed_operator_is_checked_by_its_schema_and_bound_only_when_registered(monkeypatch):
    """A listed operator of another library is checked against its reviewed schema, so a
    process that never registered it (``graphpatch-cache verify``) accepts a valid artifact and
    refuses a call that does not fit; binding needs the operator registered, with that schema."""
    from graphpatch_cache.runtime.bind import bind
    from graphpatch_cache.trust import allowlist
    from graphpatch_cache.trust.validate import check_artifact

    unregistered, mismatched = "torch.ops.graphpatch_cache_unregistered.double", "torch.ops.graphpatch_cache_test.double"
    monkeypatch.setattr(allowlist, "FUNCTIONS", allowlist.FUNCTIONS | {unregistered, mismatched})
    monkeypatch.setitem(allowlist.OPERATOR_SCHEMAS, unregistered,
                        "graphpatch_cache_unregistered::double(Tensor x) -> Tensor")
    monkeypatch.setitem(allowlist.OPERATOR_SCHEMAS, mismatched, "graphpatch_cache_test::double(Tensor x) -> Tensor")
    lib = torch.library.Library("graphpatch_cache_test", "FRAGMENT")
    lib.define("double(Tensor x, Tensor y) -> Tensor")

    artifact, model = _calling(unregistered, [{"n": "x"}])
    check_artifact(artifact)
    with pytest.raises(DisallowedTargetError, match="not registered in this process"):
        bind(artifact, model)
    with pytest.raises(GraphPatchCacheError, match="do not fit"):
        check_artifact(_calling(unregistered, [{"n": "x"}, 2])[0])
    with pytest.raises(DisallowedTargetError, match="another schema than the reviewed"):
        check_artifact(_calling(mismatched, [{"n": "x"}])[0])


def test_transformers_grouped_mm_fallback_has_its_reviewed_schema():
    import transformers.integrations.moe  # noqa: F401  (registers the operator)

    name = "torch.ops.transformers.grouped_mm_fallback"
    assert name in FUNCTIONS
    assert resolve_function(name) is torch.ops.transformers.grouped_mm_fallback


def test_torch_functional_names_are_torchs_own():
    """torch re-exports torch.functional's functions: artifacts name them as torch does."""
    assert target_name(torch.functional.split) == "torch.split"
    assert resolve_function("torch.split") is torch.functional.split


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


def test_names_with_a_trailing_newline_are_not_names():
    """``re.match`` with ``$`` accepts a trailing newline; the trust layer's name checks match
    the whole string (a name that prints like an allowed one is refused)."""
    from graphpatch_cache.trust import rules, values
    from graphpatch_cache.trust.allowlist import valid_dotted

    assert valid_dotted("torch.add") and not valid_dotted("torch.add\n")
    assert rules.IDENTIFIER.fullmatch("weight") and not rules.IDENTIFIER.fullmatch("weight\n")
    assert values._DEVICE.fullmatch("cuda:0") and not values._DEVICE.fullmatch("cuda:0\n")
