"""Mixture-of-Experts models compile fully, exactly, through the store, patchable per expert.

transformers 5 picks ``experts_implementation="grouped_mm"`` by default on every device
(``PreTrainedModel.get_correct_experts_implementation``). Traced by dynamo, that path sorts
the (token, expert) pairs by expert (``torch.sort``, ``torch.histc``, ``torch.cumsum``) and
calls one grouped matmul per projection: ``torch.ops.transformers.grouped_mm_fallback`` for
weights other than bfloat16 (CPU and CUDA alike), ``torch._grouped_mm`` for bfloat16 (CUDA
SM80+, CPU with torch > 2.10). ``"eager"`` loops over the experts that got tokens: the loop's
length is data (``nonzero``), so that module stays opaque.

Oracles: the plain model (``torch.equal`` on logits), forward hooks on its router and on its
experts' activation module, the same model with one expert's weights zeroed, and the store's
hit/miss counts. One extraction per model (the store's miss), shared by the module.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest
import torch

from graphpatch_cache import CacheStore, PatchableGraph, ProbePatch, ZeroPatch, build, load_cached

from tiny_models import MOE_FAMILIES, moe_layer, tiny_moe, token_inputs

pytestmark = pytest.mark.slow  # extracts four MoE families

transformers = pytest.importorskip("transformers")

FALLBACK = "torch.ops.transformers.grouped_mm_fallback"


@dataclass
class Case:
    family: str
    model: torch.nn.Module
    inputs: Dict[str, Any]
    miss: Any  # load_cached's first call: extracted and stored
    hit: Any  # the second: bound from the store
    layer: int
    root: Path  # the store's root

    @property
    def mlp(self) -> torch.nn.Module:
        return self.model.model.layers[self.layer].mlp

    def path(self, node: str) -> str:
        return f"model.layers_{self.layer}.mlp.{node}"


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def case(request, tmp_path_factory) -> Case:
    family = request.param
    model = tiny_moe(family)
    inputs = token_inputs(batch=2, seq=7)
    root = tmp_path_factory.mktemp(family) / "root"
    store = CacheStore(root)
    miss = load_cached(model, store=store, **inputs)
    hit = load_cached(model, store=store, **inputs)
    return Case(family, model, inputs, miss, hit, moe_layer(family), root)


def _graphs(graph: Any) -> List[Any]:
    out = [graph]
    for child in graph.children:
        out += _graphs(child)
    return out


def _targets(artifact: Any) -> Set[str]:
    return {nd.target for g in _graphs(artifact.root) for nd in g.nodes if nd.op == "call_function"}


def _logits(pg_or_model: Any, inputs: Dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return pg_or_model(**inputs).logits


def test_default_experts_compile_fully_and_exactly(case: Case):
    """No opaque graph; the experts call transformers' grouped matmul operator; logits equal
    the model's at the example shape and at others (one variant: shape-generic)."""
    assert case.model.config._experts_implementation == "grouped_mm"
    artifact = case.miss.artifact
    assert artifact.extraction["opaque"] == {}
    assert {g.kind for g in _graphs(artifact.root)} == {"compiled"}
    assert {FALLBACK, "torch.sort", "graphpatch_cache.functions.histc"} <= _targets(artifact)
    for batch, seq in [(2, 7), (3, 11), (2, 2)]:
        inputs = token_inputs(batch=batch, seq=seq, seed=batch * seq)
        assert torch.equal(_logits(case.miss, inputs), _logits(case.model, inputs)), (batch, seq)
    assert len(case.miss.variants) == 1


def test_cache_hit_round_trip(case: Case):
    """The second load_cached is a hit, bound to the model's own expert weights, and exact."""
    assert (case.miss.cache_stats.misses, case.miss.cache_stats.hits) == (1, 0)
    assert (case.hit.cache_stats.misses, case.hit.cache_stats.hits) == (0, 1)
    assert case.hit.artifact.extraction["opaque"] == {}
    assert torch.equal(_logits(case.hit, case.inputs), _logits(case.model, case.inputs))
    assert torch.equal(_logits(case.hit, case.inputs), _logits(case.miss, case.inputs))
    weight = case.mlp.experts.gate_up_proj
    bound = [t for t in case.hit.parameters() if t.data_ptr() == weight.data_ptr()]
    assert bound and all(t is weight for t in bound)


_VERIFY = """
import sys
from graphpatch_cache import CacheStore
report = CacheStore(sys.argv[1], local_dir=sys.argv[2]).check()
assert report.checked == 1 and not report.problems, report
assert "transformers.integrations.moe" not in sys.modules and "transformers" not in sys.modules
print("ok")
"""


@pytest.mark.subprocess
def test_verify_accepts_the_entry_without_transformers(case: Case, tmp_path):
    """``graphpatch-cache verify`` runs the loader's checks in a process that never imported
    transformers: transformers' operator is checked against its reviewed schema there."""
    proc = subprocess.run([sys.executable, "-c", _VERIFY, str(case.root), str(tmp_path / "local")],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_router_logits_probe_equals_a_hook_on_the_router(case: Case):
    seen: List[torch.Tensor] = []
    handle = case.mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[0].detach().clone()))
    try:
        expected = _logits(case.model, case.inputs)
    finally:
        handle.remove()
    probe = ProbePatch()
    with case.hit.patch({case.path("gate.router_logits"): probe}):
        got = _logits(case.hit, case.inputs)
    assert len(seen) == 1 and seen[0].shape == (2 * 7, 4)
    assert torch.equal(probe.activation, seen[0])
    assert torch.equal(got, expected)


def _rows_of_busiest_expert(case: Case) -> tuple:
    """(expert, rows of the experts' sorted (token, expert) pairs that expert computes)."""
    probe = ProbePatch()
    with case.hit.patch({case.path("experts.expert_ids_g"): probe}):
        _logits(case.hit, case.inputs)
    ids = probe.activation
    expert = int(torch.bincount(ids).argmax())
    return expert, (ids == expert).nonzero().squeeze(1)


def test_one_experts_activation_patched_equals_a_hook(case: Case):
    """Zero expert e's rows of the gated activation (``proj_out = act_fn(gate) * up``): the
    oracle zeroes the same rows of the plain model's ``experts.act_fn`` output by a hook."""
    expert, rows = _rows_of_busiest_expert(case)
    assert 0 < len(rows) < 2 * 7 * 2

    def hook(module, args, output):
        output = output.clone()
        output[rows] = 0
        return output

    unpatched = _logits(case.model, case.inputs)
    handle = case.mlp.experts.act_fn.register_forward_hook(hook)
    try:
        expected = _logits(case.model, case.inputs)
    finally:
        handle.remove()
    with case.hit.patch({case.path("experts.proj_out"): ZeroPatch(slice=rows)}):
        got = _logits(case.hit, case.inputs)
    assert not torch.equal(expected, unpatched)
    assert torch.equal(got, expected)
    assert torch.equal(_logits(case.hit, case.inputs), unpatched)


def test_one_experts_output_patched_equals_zeroing_its_weights(case: Case):
    """Zero expert e's rows of the down projection (``out_1``, one grouped matmul over the
    experts): the same as the plain model with expert e's ``down_proj`` zeroed."""
    expert, rows = _rows_of_busiest_expert(case)
    ablated = copy.deepcopy(case.model)
    with torch.no_grad():
        ablated.model.layers[case.layer].mlp.experts.down_proj[expert] = 0
    expected = _logits(ablated, case.inputs)
    with case.miss.patch({case.path("experts.out_1"): ZeroPatch(slice=rows)}):
        got = _logits(case.miss, case.inputs)
    assert not torch.equal(expected, _logits(case.model, case.inputs))
    assert torch.equal(got, expected)


def test_gradients_equal_the_models(case: Case):
    """Backward through the graph (transformers' operator brings its own autograd) gives the
    model's gradients, the router's and the experts' weights included."""
    def grads(f: Any) -> Dict[str, torch.Tensor]:
        case.model.zero_grad(set_to_none=True)
        f(**case.inputs).logits.pow(2).mean().backward()
        out = {n: p.grad.clone() for n, p in case.model.named_parameters() if p.grad is not None}
        case.model.zero_grad(set_to_none=True)
        return out

    expected, got = grads(case.model), grads(case.hit)
    assert {"experts.gate_up_proj", "gate.weight"} <= {n.split("mlp.", 1)[-1] for n in expected}
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected), [n for n in expected
                                                                     if not torch.equal(got[n], expected[n])]


def test_built_on_the_meta_device_serves_cpu(tmp_path):
    """``graphpatch-cache build`` traces on the meta device, where transformers counts tokens per
    expert with an integer histogram (its CUDA path; CPU has no integer kernel): the stored
    graph still runs on CPU, exactly, from a hit."""
    model = tiny_moe("mixtral")
    inputs = token_inputs(batch=2, seq=7)
    store = CacheStore(tmp_path / "root")
    built = build(model.config, store=store, **inputs)
    assert "meta" in built.artifact.extraction["devices"] and built.artifact.extraction["opaque"] == {}
    pg = load_cached(model, store=store, **inputs)
    assert (pg.cache_stats.hits, pg.cache_stats.misses) == (1, 0)
    assert torch.equal(_logits(pg, inputs), _logits(model, inputs))


def test_bfloat16_experts_call_torch_grouped_mm():
    """bfloat16 weights take torch's grouped matmul (the default path on CUDA SM80+), which
    graphs call through the library's stand-in that bounds its offsets."""
    model = tiny_moe("mixtral", dtype=torch.bfloat16)
    inputs = token_inputs(batch=2, seq=7)
    pg = PatchableGraph(model, **inputs)
    assert pg.artifact.extraction["opaque"] == {}
    targets = _targets(pg.artifact)
    assert "graphpatch_cache.functions.grouped_mm" in targets and FALLBACK not in targets
    assert torch.equal(_logits(pg, inputs), _logits(model, inputs))


def test_eager_experts_stay_opaque_and_the_router_is_a_node():
    """``experts_implementation="eager"`` loops over ``nonzero()``'s rows: a trip count that is
    data, which no dynamo setting turns into one graph. The experts module stays opaque (its
    inputs, outputs and weights patchable); the router compiles and its logits are a node."""
    model = tiny_moe("mixtral", experts="eager")
    inputs = token_inputs(batch=2, seq=7)
    pg = PatchableGraph(model, **inputs)
    opaque = pg.artifact.extraction["opaque"]
    assert set(opaque) == {f"model.layers.{i}.mlp.experts" for i in range(2)}
    assert all("data-dependent" in why for why in opaque.values()), opaque
    seen: List[torch.Tensor] = []
    handle = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[0].clone()))
    try:
        expected = _logits(model, inputs)
    finally:
        handle.remove()
    probe = ProbePatch()
    with pg.patch({"model.layers_0.mlp.gate.router_logits": probe}):
        assert torch.equal(_logits(pg, inputs), expected)
    assert torch.equal(probe.activation, seen[0])
