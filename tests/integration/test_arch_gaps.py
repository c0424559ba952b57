"""Three architecture gaps: Bloom's custom autograd Function, DeBERTa-v2's ``rel_embeddings``
read without a call, and patches on nodes whose value is a Python number.

- Bloom (``BloomGelu`` calls ``GeLUFunction.apply``): fully compiled, exact, a store hit. The
  Function's forward ops are ordinary nodes of ``gelu_impl``; a backward pass through them
  raises ``UnsupportedGradientError``; keeping the calling module opaque gives the model's
  own gradients.
- DeBERTa-v2 (``encoder.rel_embeddings.weight`` read directly): extracted with
  ``allow_unused_submodules=False``, fully compiled, exact, a store hit.
- Patches on an ``int`` node (Bloom's batch size): ZeroPatch, a tensor or a slice refused
  when ``pg.patch`` is entered; looking, and a deliberate Python value, allowed.

Oracles: the plain model (``torch.equal``, forward hooks, its own gradients), cache stats.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from graphpatch_cache import (CacheStore, CustomPatch, DisallowedTargetError, ExtractionOptions,
                              NonTensorPatchError, PatchableGraph, ProbePatch, ReplacePatch, UnsupportedGradientError,
                              AddPatch, ZeroPatch, load_cached)
from graphpatch_cache.artifact import NodeData
from graphpatch_cache.trust import validate

from hand_built import scaling_artifact

transformers = pytest.importorskip("transformers")
bloom_module = pytest.importorskip("transformers.models.bloom.modeling_bloom")

VOCAB = 128
BATCH_SIZE = "transformer.h_0.self_attention.size"  # hidden_states.size(0), an int


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))


def _store(tmp_path_factory, name: str) -> CacheStore:
    tmp = tmp_path_factory.mktemp(name)
    return CacheStore(tmp / "root", local_dir=tmp / "local")


def _cached_twice(model, store, options=None, **inputs):
    """The miss that extracts and stores, then a load that must be a hit."""
    miss = load_cached(model, store=store, options=options, **inputs)
    assert miss.cache_stats.misses == 1
    hit = load_cached(model, store=store, options=options, **inputs)
    assert hit.cache_stats.hits == 1 and hit.cache_stats.misses == 0
    return hit


def _fully_compiled(pg) -> None:
    assert pg.artifact.extraction["opaque"] == {}
    assert all(g.kind == "compiled" for g in pg.artifact.root.walk())


# -- Bloom -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=VOCAB)
    model = transformers.BloomForCausalLM._from_config(config).eval()
    pg = _cached_twice(model, _store(tmp_path_factory, "bloom"), input_ids=_ids(2, 8), use_cache=False)
    return model, pg


@pytest.mark.slow
def test_bloom_is_fully_compiled_exact_and_shape_generic(bloom):
    model, pg = bloom
    _fully_compiled(pg)
    gelu = next(g for g in pg.artifact.root.walk() if g.module_path == "transformer.h.0.mlp.gelu_impl")
    targets = [n.target for n in gelu.nodes]
    assert "torch.tanh" in targets and "graphpatch_cache.functions.forward_only" in targets
    for batch, seq in ((2, 8), (3, 5)):
        ids = _ids(batch, seq)
        with torch.no_grad():
            assert torch.equal(pg(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits)
    ids = _ids(2, 8)  # grad mode on (eval): the same values
    assert torch.equal(pg(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits)


@pytest.mark.slow
def test_bloom_function_ops_are_patchable(bloom):
    """The Function's inlined ops are nodes: zeroing its result equals a forward hook that
    zeroes ``gelu_impl``'s output on the plain model."""
    model, pg = bloom
    ids = _ids(2, 8)
    with torch.no_grad(), pg.patch({"transformer.h_0.mlp.gelu_impl.outs": ZeroPatch(),
                                    "transformer.h_0.mlp.gelu_impl.tanh": (probe := ProbePatch())}):
        patched = pg(input_ids=ids, use_cache=False).logits
    seen = {}

    def hook(module, args, out):
        seen["x"] = args[0]
        return torch.zeros_like(out)

    handle = model.transformer.h[0].mlp.gelu_impl.register_forward_hook(hook)
    try:
        with torch.no_grad():
            expected = model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    assert torch.equal(patched, expected)
    x = seen["x"]
    assert torch.equal(probe.activation, torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


@pytest.mark.slow
def test_bloom_backward_is_refused(bloom):
    _, pg = bloom
    out = pg(input_ids=_ids(2, 8), use_cache=False).logits
    assert out.requires_grad
    with pytest.raises(UnsupportedGradientError, match="GeLUFunction") as info:
        out.sum().backward()
    assert info.value.function == "GeLUFunction" and "classes_to_skip_compiling=(BloomGelu,)" in str(info.value)
    pg.zero_grad()


class _GeluMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.act = bloom_module.BloomGelu()
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        h = self.act(self.up(x))
        h.mul_(2)  # a write into the Function's output (autograd refuses one into a view made inside a Function)
        return self.down(h)


@pytest.mark.slow
def test_autograd_function_gradients_refused_or_exact_with_the_module_opaque():
    torch.manual_seed(0)
    model = _GeluMLP()
    x = torch.randn(3, 8)
    inlined = PatchableGraph(model, x)
    assert inlined.artifact.extraction["opaque"] == {}
    assert torch.equal(inlined(x), model(x))
    with pytest.raises(UnsupportedGradientError):
        inlined(x).sum().backward()
    model.zero_grad(set_to_none=True)
    opaque = PatchableGraph(model, ExtractionOptions(classes_to_skip_compiling=(bloom_module.BloomGelu,)), x)
    assert next(g for g in opaque.artifact.root.walk() if g.module_path == "act").kind == "opaque"
    opaque(x).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    for name, p in model.named_parameters():
        assert torch.equal(got[name], p.grad), name


def test_forward_only_arguments_are_checked():
    """The loader takes forward_only only as (identifier, node)."""
    good = scaling_artifact()
    nodes = list(good.root.nodes)
    for args in ({"t": ["GeLUFunction", {"n": "mul"}]}, {"t": ["BloomGelu.GeLUFunction", {"n": "mul"}]},
                 {"t": ["os.system('x')", {"n": "mul"}]}, {"t": ["a.b.c", {"n": "mul"}]},
                 {"t": ["GeLUFunction", 3]}, {"t": ["GeLUFunction\n", {"n": "mul"}]}):
        extra = NodeData(name="fo", op="call_function", target="graphpatch_cache.functions.forward_only",
                         args=args, kwargs={"d": []}, meta={})
        root = dataclasses.replace(good.root, nodes=nodes[:2] + [extra] + nodes[2:])
        artifact = dataclasses.replace(good, root=root)
        if args["t"][0].endswith("GeLUFunction") and isinstance(args["t"][1], dict):
            validate.check_artifact(artifact)
        else:
            with pytest.raises(DisallowedTargetError, match="forward_only"):
                validate.check_artifact(artifact)


# -- DeBERTa-v2 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deberta(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.DebertaV2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=VOCAB,
        max_position_embeddings=64, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"])
    model = transformers.DebertaV2Model._from_config(config).eval()
    options = ExtractionOptions(allow_unused_submodules=False)  # rel_embeddings is never called
    pg = _cached_twice(model, _store(tmp_path_factory, "deberta"), options, input_ids=_ids(2, 8))
    return model, pg


@pytest.mark.slow
def test_deberta_v2_is_fully_compiled_exact_and_cached(deberta):
    model, pg = deberta
    _fully_compiled(pg)
    for batch, seq in ((2, 8), (3, 6)):
        ids = _ids(batch, seq)
        with torch.no_grad():
            assert torch.equal(pg(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


@pytest.mark.slow
def test_deberta_v2_rel_embeddings_weight_is_the_models(deberta):
    """The weight read without a call is a node bound to the model's own parameter: zeroing
    it equals zeroing the parameter of a copy of the model."""
    model, pg = deberta
    assert any(model.encoder.rel_embeddings.weight is t for t in pg.parameters())
    ids = _ids(2, 8)
    with torch.no_grad(), pg.patch({"encoder.rel_embeddings_weight": ZeroPatch()}):
        patched = pg(input_ids=ids).last_hidden_state
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.encoder.rel_embeddings.weight.zero_()
        assert torch.equal(patched, zeroed(input_ids=ids).last_hidden_state)
        assert not torch.equal(patched, model(input_ids=ids).last_hidden_state)


# -- patches on Python numbers -----------------------------------------------------------------------


_REFUSED = [ZeroPatch(), ReplacePatch(value=torch.tensor(2)), AddPatch(value=torch.ones(1)),
            ReplacePatch(value=2, slice=0)]


@pytest.mark.slow
def test_writing_patches_on_an_int_node_are_refused_on_entry(bloom):
    model, pg = bloom
    for patch in _REFUSED:
        entered = False
        with pytest.raises(NonTensorPatchError) as info:
            with pg.patch({BATCH_SIZE: patch}):
                entered = True
        assert not entered, patch
        assert info.value.node_path == BATCH_SIZE and info.value.value_type == "int"
        assert BATCH_SIZE in str(info.value) and type(patch).__name__ in str(info.value)
    ids = _ids(2, 8)
    with torch.no_grad():  # nothing left installed
        assert torch.equal(pg(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits)


@pytest.mark.slow
def test_looking_at_or_deliberately_replacing_an_int_node(bloom):
    model, pg = bloom
    ids = _ids(2, 8)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        seen = []
        with pg.patch({BATCH_SIZE: [probe := ProbePatch(), AddPatch(value=1), ReplacePatch(value=2),
                                    CustomPatch(custom_op=lambda v: (seen.append(v), v)[1])]}):
            assert torch.equal(pg(input_ids=ids, use_cache=False).logits, expected)
        assert probe.activation == 2 and seen == [2]
        # the same paths entered again take the remembered block: still checked per patch
        with pg.patch({BATCH_SIZE: ProbePatch()}):
            pg(input_ids=ids, use_cache=False)
        with pytest.raises(NonTensorPatchError):
            with pg.patch({BATCH_SIZE: ZeroPatch()}):
                pass
        with pg.patch({BATCH_SIZE: ReplacePatch(value=3)}):  # deliberate: fails in the forward pass
            with pytest.raises(RuntimeError):
                pg(input_ids=ids, use_cache=False)
        assert torch.equal(pg(input_ids=ids, use_cache=False).logits, expected)
