"""What code written for graphpatch 0.2.3 needs from us (issue 10, "Compatibility"): its patch
override point and dataclass style, list-form slices, ValueError-compatible errors, its
ExtractionOptions fields and defaults, ``pg.generation_config``, file-like save/load,
pickling refused, and the ``graphpatch_cache.compat.graphpatch`` import module.

Oracles: the plain model (with the same modification made by hand or by a forward hook),
files on disk, and values computed from the model's own modules.
"""

from __future__ import annotations

import copy
import io
import pickle
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from tiny_models import tiny_gpt2, token_inputs
from graphpatch_cache import (
    AddPatch,
    ArtifactFormatError,
    CustomPatch,
    ExtractionOptions,
    NodePathError,
    NotPicklableError,
    Patch,
    PatchableGraph,
    PatchError,
    PatchMapError,
    ProbePatch,
    RecordPatch,
    ReplacePatch,
    UnusedSubmoduleError,
    ZeroPatch,
    cache_key,
)
from graphpatch_cache.errors import GraphPatchCacheError

pytestmark = pytest.mark.slow  # gpt2_pg extracts a GPT-2 (about 7 s here); the user script extracts again


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        return self.out(torch.relu(self.lin(x)))


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x) * 2


def small(seed: int = 0) -> Small:
    torch.manual_seed(seed)
    return Small().eval()


@pytest.fixture(scope="module")
def small_pg():
    model = small()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    return model, x, PatchableGraph(model, x)


def _hidden(model: Small, x: torch.Tensor) -> torch.Tensor:
    """The value at node ``relu``, computed from the model's own modules."""
    return torch.relu(model.lin(x))


# -- Patch: op and apply, generic, dataclass subclasses -------------------------------------------------------


@dataclass(kw_only=True)
class ScalePatch(Patch[torch.Tensor]):
    """graphpatch's documented way to write a patch: a keyword-only dataclass overriding op."""

    scale: float

    def op(self, original_output):
        return original_output * self.scale


def test_graphpatch_style_dataclass_patch_with_op(small_pg):
    model, x, pg = small_pg
    with pg.patch({"relu": ScalePatch(scale=3.0)}):
        got = pg(x)
    assert torch.equal(got, model.out(_hidden(model, x) * 3.0))
    assert torch.equal(pg(x), model(x))  # unpatched again after the block


def test_requires_clone_graphpatch_style(small_pg):
    """A subclass clones by default, so an in-place op leaves the graph's value alone; a
    read-only one hides the field (graphpatch's `field(default=False, init=False)`)."""
    model, x, pg = small_pg

    @dataclass(kw_only=True)
    class InPlaceDouble(Patch[torch.Tensor]):
        def op(self, original_output):
            return original_output.mul_(2)

    @dataclass(kw_only=True)
    class Peek(Patch[torch.Tensor]):
        requires_clone: bool = field(default=False, init=False)
        seen: list = field(default_factory=list)

        def op(self, original_output):
            self.seen.append(original_output)
            return original_output

    weight = model.lin.weight.detach().clone()
    with torch.no_grad(), pg.patch({"lin.weight": InPlaceDouble()}):
        got = pg(x)
    assert torch.equal(model.lin.weight, weight)  # the weight was not written
    assert torch.equal(got, model.out(torch.relu(nn.functional.linear(x, weight * 2, model.lin.bias))))

    value = torch.ones(3)
    peek = Peek()
    assert peek(value) is value and peek.seen[0] is value  # no clone
    with pytest.raises(TypeError):
        Peek(requires_clone=True)
    assert InPlaceDouble().requires_clone and not ProbePatch().requires_clone
    assert CustomPatch(custom_op=lambda v: v).requires_clone
    assert not CustomPatch(custom_op=lambda v: v, requires_clone=False).requires_clone


def test_list_slice_in_a_graph(small_pg):
    model, x, pg = small_pg
    with pg.patch({"relu": AddPatch(value=0.5, slice=[slice(1, 3), 2])}):
        got = pg(x)
    hidden = _hidden(model, x)
    hidden[1:3, 2] += 0.5
    assert torch.equal(got, model.out(hidden))


# -- errors are ValueErrors (and KeyErrors for paths) ------------------------------------------------------


def test_errors_keep_graphpatch_except_clauses_working(small_pg):
    model, x, pg = small_pg
    with pytest.raises(ValueError) as info:  # graphpatch: a bad path is a KeyError
        with pg.patch({"lin.no_such_node": ZeroPatch()}):
            pass
    assert isinstance(info.value, KeyError) and isinstance(info.value, NodePathError)
    with pytest.raises(ValueError) as info:  # a patch that does not fit the value
        with pg.patch({"relu": ZeroPatch(slice=(slice(None), 9))}):
            pg(x)
    assert isinstance(info.value, PatchError) and info.value.node_path == "relu"
    assert torch.equal(pg(x), model(x))
    for bad in ({"relu": 3}, {"relu": [ZeroPatch(), print]}, {3: ZeroPatch()}, ["relu"]):
        with pytest.raises(ValueError) as info:  # graphpatch: ValueError; ours before: TypeError
            with pg.patch(bad):
                pass
        assert isinstance(info.value, PatchMapError) and isinstance(info.value, TypeError)
    assert issubclass(PatchMapError, ValueError) and issubclass(PatchMapError, TypeError)
    assert issubclass(PatchMapError, GraphPatchCacheError)
    err = pickle.loads(pickle.dumps(PatchMapError("bad map", node_path="relu")))
    assert isinstance(err, ValueError) and err.node_path == "relu"


# -- ExtractionOptions ------------------------------------------------------------------------------------------


def test_allow_unused_submodules_default_is_graphpatchs():
    assert ExtractionOptions().allow_unused_submodules is True
    assert ExtractionOptions(error_on_compilation_failure=True).allow_unused_submodules is False
    assert ExtractionOptions(error_on_compilation_failure=True, allow_unused_submodules=True).allow_unused_submodules
    assert ExtractionOptions() == ExtractionOptions(allow_unused_submodules=True)
    assert ExtractionOptions().fingerprint()["allow_unused_submodules"] is True
    strict = ExtractionOptions(error_on_compilation_failure=True)
    assert strict.fingerprint()["allow_unused_submodules"] is False

    torch.manual_seed(0)
    model = WithUnused().eval()
    x = torch.randn(3, 4)
    pg = PatchableGraph(model, x)  # graphpatch's default: an unused submodule is normal
    assert torch.equal(pg(x), model(x))
    with pytest.raises(UnusedSubmoduleError):
        PatchableGraph(model, strict, x)
    # the resolved value is what enters the key
    assert cache_key(model, x, options=ExtractionOptions()) == \
        cache_key(model, x, options=ExtractionOptions(allow_unused_submodules=True))
    assert cache_key(model, x, options=ExtractionOptions()) != \
        cache_key(model, x, options=ExtractionOptions(allow_unused_submodules=False))


def test_postprocessing_function_takes_graphpatchs_arguments():
    model = small()
    x = torch.randn(5, 4)
    seen = []

    def double_output(graph_module, module):
        """graphpatch's documented use: edit the graph in place (here: double the output)."""
        seen.append((graph_module, module))
        graph = graph_module.graph
        out = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(out):
            doubled = graph.call_function(torch.mul, (out.args[0], 2.0))
        out.args = (doubled,)
        graph_module.recompile()

    pg = PatchableGraph(model, ExtractionOptions(postprocessing_function=double_output), x)
    assert len(seen) == 1 and isinstance(seen[0][0], torch.fx.GraphModule) and seen[0][1] is model
    assert torch.equal(pg(x), model(x) * 2.0)

    old_form = []  # this library's earlier one-argument form still works
    PatchableGraph(model, ExtractionOptions(postprocessing_function=old_form.append), x)
    assert len(old_form) == 1 and isinstance(old_form[0], torch.fx.GraphModule)

    with pytest.raises(TypeError, match="graph_module, module"):
        ExtractionOptions(postprocessing_function=lambda: None)
    with pytest.raises(TypeError, match="graph_module, module"):
        ExtractionOptions(postprocessing_function=lambda a, b, c: None)
    with pytest.raises(TypeError, match="callable"):
        ExtractionOptions(postprocessing_function=3)


# -- generation_config --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_pg():
    model = tiny_gpt2(n_layer=1)
    inputs = token_inputs(batch=1, seq=6)
    return model, inputs, PatchableGraph(model, **inputs)


def test_generation_config_is_a_copy(gpt2_pg):
    model, inputs, pg = gpt2_pg
    assert pg.generation_config is not None and pg.generation_config is not model.generation_config
    assert pg.generation_config.to_dict() == model.generation_config.to_dict()
    assert pg.config is not model.config and pg.config.to_dict() == model.config.to_dict()


def test_probe_of_a_structured_output_keeps_a_copy(gpt2_pg):
    """graphpatch deep-copies non-tensor values it records; we copy every tensor inside."""
    model, inputs, pg = gpt2_pg
    probe, record = ProbePatch(), RecordPatch()
    with pg.patch({"output": [probe, record]}):
        out = pg(**inputs)
    for kept in (probe.activation, record.activations[0]):
        assert type(kept) is type(out) and torch.equal(kept.logits, model(**inputs).logits)
        assert kept.logits.data_ptr() != out.logits.data_ptr() and not kept.logits.requires_grad


def test_generate_reads_the_graphs_generation_config(gpt2_pg):
    model, inputs, pg = gpt2_pg
    ids = inputs["input_ids"]
    first = int(model(ids).logits[0, -1].argmax())
    second_ids = torch.cat([ids, torch.tensor([[first]])], dim=-1)
    second = int(model(second_ids).logits[0, -1].argmax())
    eos_before = pg.generation_config.eos_token_id
    try:
        pg.generation_config.eos_token_id = first  # stop right after the first token
        out = pg.generate(ids, max_new_tokens=4, use_cache=False)
    finally:
        pg.generation_config.eos_token_id = eos_before
    assert out.tolist() == second_ids.tolist()
    assert model.generation_config.eos_token_id == eos_before  # the model's own is untouched
    if first != eos_before and second != eos_before:
        assert pg.generate(ids, max_new_tokens=2, use_cache=False).tolist() == \
            torch.cat([second_ids, torch.tensor([[second]])], dim=-1).tolist()


def test_generation_config_none_when_off_or_not_transformers():
    model = tiny_gpt2(n_layer=1)
    inputs = token_inputs(batch=1, seq=4)
    pg = PatchableGraph.from_artifact(model, PatchableGraph(model, **inputs).artifact,
                                      options=ExtractionOptions(copy_transformers_generation_config=False))
    assert pg.generation_config is None and pg.config is None
    assert PatchableGraph(small(), torch.randn(2, 4)).generation_config is None


# -- save / load with file objects; pickling ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["binary", "text"])
def test_save_and_load_file_objects(small_pg, tmp_path, mode):
    model, x, pg = small_pg
    on_disk = tmp_path / "graph.json"
    pg.save(on_disk)
    expected = on_disk.read_bytes()

    buffer = io.BytesIO() if mode == "binary" else io.StringIO()
    pg.save(buffer)
    written = buffer.getvalue()
    assert (written if mode == "binary" else written.encode()) == expected
    buffer.seek(0)
    loaded = PatchableGraph.load(buffer, model)
    assert torch.equal(loaded(x), model(x))

    path = tmp_path / f"open-{mode}.json"
    with open(path, "wb" if mode == "binary" else "w") as f:
        pg.save(f)
    assert path.read_bytes() == expected
    with open(path, "rb" if mode == "binary" else "r") as f:
        loaded = PatchableGraph.load(f, model)
    with loaded.patch({"relu": ZeroPatch()}):
        assert torch.equal(loaded(x), model.out(torch.zeros(5, 3)))


def test_load_refuses_pickles_and_wants_the_model(small_pg, tmp_path):
    model, x, pg = small_pg
    buffer = io.BytesIO()
    torch.save({"anything": torch.ones(2)}, buffer)  # what graphpatch's pg.save wrote: a torch pickle
    buffer.seek(0)
    with pytest.raises(ArtifactFormatError, match="pickle"):
        PatchableGraph.load(buffer, model)
    with pytest.raises(ArtifactFormatError, match="pickle"):
        PatchableGraph.load(io.BytesIO(pickle.dumps([1, 2])), model)
    pg.save(tmp_path / "g.json")
    with pytest.raises(TypeError, match=r"load\(file, model\)"):
        PatchableGraph.load(tmp_path / "g.json")


def test_pickling_is_refused_with_a_pointer_to_save(small_pg):
    model, x, pg = small_pg
    for attempt in (lambda: pickle.dumps(pg), lambda: torch.save(pg, io.BytesIO()), lambda: copy.copy(pg)):
        with pytest.raises(NotPicklableError, match="cannot be pickled") as info:
            attempt()
        assert isinstance(info.value, TypeError) and "pg.save(file)" in str(info.value)
    torch.save(pg.state_dict(), io.BytesIO())  # the weights still save as usual


def test_deepcopy_copies_model_and_graphs(small_pg):
    model, x, pg = small_pg
    probe = ProbePatch()
    with pg.patch({"relu": ZeroPatch()}):
        twin = copy.deepcopy(pg)  # patches belong to the original's block: the copy is unpatched
        assert torch.equal(twin(x), model(x))
        assert torch.equal(pg(x), model.out(torch.zeros(5, 3)))
    assert twin.model is not model and isinstance(twin.model, Small)
    assert twin.model.lin.weight.data_ptr() != model.lin.weight.data_ptr()
    assert len(twin.variants) == len(pg.variants)
    with torch.no_grad():
        twin.model.lin.weight.mul_(2)  # the copy binds its own model's weights
    expected = twin.model(x)
    assert torch.equal(twin(x), expected) and not torch.equal(expected, model(x))
    with twin.patch({"lin.output": probe}):
        twin(x)
    assert torch.equal(probe.activation, twin.model.lin(x))
    assert torch.equal(pg(x), model(x))


def test_deepcopy_of_an_opaque_graph_binds_the_copied_model():
    model = small(seed=3)
    x = torch.randn(4, 4)
    pg = PatchableGraph(model, ExtractionOptions(skip_compilation=True), x)
    twin = copy.deepcopy(pg)
    with torch.no_grad():
        twin.model.out.bias.add_(1.0)
    assert torch.equal(twin(x), twin.model(x)) and torch.equal(pg(x), model(x))
    assert not torch.equal(twin(x), model(x))
    hidden = _hidden(twin.model, x)
    with twin.patch({"out.bias": ZeroPatch()}):
        assert torch.equal(twin(x), nn.functional.linear(hidden, twin.model.out.weight,
                                                         torch.zeros_like(twin.model.out.bias)))


def test_deepcopy_keeps_generation_config(gpt2_pg):
    model, inputs, pg = gpt2_pg
    twin = copy.deepcopy(pg)
    assert twin.generation_config is not pg.generation_config
    assert twin.generation_config.to_dict() == pg.generation_config.to_dict()
    assert torch.equal(twin(**inputs).logits, model(**inputs).logits)


# -- nested contexts ------------------------------------------------------------------------------------------------


def test_nested_contexts_run_outer_patches_first(small_pg):
    """graphpatch extends the outer context's list with the inner one's: outer first."""
    model, x, pg = small_pg
    hidden = _hidden(model, x)
    outer_record, inner_record, after_both = RecordPatch(), RecordPatch(), RecordPatch()
    with pg.patch({"relu": [outer_record, AddPatch(value=1.0)]}):
        with pg.patch({"relu": [inner_record, ReplacePatch(value=2.0, slice=(0,)), after_both]}):
            got = pg(x)
        pg(x)
    expected = hidden + 1.0
    expected[0] = 2.0
    assert torch.equal(got, model.out(expected))
    assert len(outer_record.activations) == 2 and len(inner_record.activations) == 1
    assert torch.equal(outer_record.activations[0], hidden)
    assert torch.equal(inner_record.activations[0], hidden + 1.0)  # saw the outer AddPatch
    assert torch.equal(after_both.activations[0], expected)
    assert torch.equal(pg(x), model(x))


def test_a_graphpatch_user_script_runs_on_the_compat_module():
    """A short graphpatch-style session, only the import line changed; every result is
    checked against the plain model with the same change made by forward hooks."""
    from graphpatch_cache.compat.graphpatch import (AddPatch, CustomPatch, ExtractionOptions, Patch,
                                                    PatchableGraph, ProbePatch, RecordPatch, ZeroPatch)

    @dataclass(kw_only=True)
    class NegatePatch(Patch[torch.Tensor]):
        def op(self, original_output):
            original_output.neg_()  # in place: fine, patches get a clone
            return original_output

    model = tiny_gpt2(n_layer=2)
    inputs = token_inputs(batch=2, seq=5)
    options = ExtractionOptions(skip_compilation=False, error_on_compilation_failure=False,
                                classes_to_skip_compiling=set())
    pg = PatchableGraph(model, options, **inputs)

    # pg.graph: attribute access down the module tree, shapes of values
    mlp = pg.graph.transformer.h_0.mlp
    assert str(mlp.output) == "transformer.h_0.mlp.output"
    assert "h_1" in dir(pg.graph.transformer)

    blocks = model.transformer.h

    def run_plain(hooks):
        handles = [module.register_forward_hook(hook) for module, hook in hooks]
        try:
            return model(**inputs).logits
        finally:
            for handle in handles:
                handle.remove()

    # 1. probe: the MLP output of block 0
    probe = ProbePatch()
    with pg.patch({"transformer.h_0.mlp.output": probe}):
        logits = pg(**inputs).logits
    seen = []
    plain = run_plain([(blocks[0].mlp, lambda m, i, o: seen.append(o.detach().clone()))])
    assert torch.equal(logits, plain) and torch.equal(probe.activation, seen[0])

    # 2. zero a slice, add to a slice, a custom op and a user patch, recorded along the way
    delta = torch.ones(32) * 0.25
    record = RecordPatch()
    patches = {
        "transformer.h_0.mlp.output": [ZeroPatch(slice=[slice(None), 0]), record],
        "transformer.h_1.mlp.output": AddPatch(value=delta, slice=(slice(None), slice(1, 3))),
        "transformer.h_0.output": CustomPatch(custom_op=lambda t: t * 0.5),
        "transformer.ln_f.output": NegatePatch(),
    }
    with pg.patch(patches):
        logits = pg(**inputs).logits

    def zero_first(module, args, out):
        out = out.clone()
        out[:, 0] = 0
        return out

    def add_delta(module, args, out):
        out = out.clone()
        out[:, 1:3] += delta
        return out

    plain = run_plain([
        (blocks[0].mlp, zero_first),
        (blocks[1].mlp, add_delta),
        (blocks[0], lambda m, i, o: (o[0] * 0.5,) + tuple(o[1:]) if isinstance(o, tuple) else o * 0.5),
        (model.transformer.ln_f, lambda m, i, o: -o),
    ])
    assert torch.equal(logits, plain)
    assert len(record.activations) == 1 and bool((record.activations[0][:, 0] == 0).all())

    # 3. nothing stays patched
    assert torch.equal(pg(**inputs).logits, model(**inputs).logits)
