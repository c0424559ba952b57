"""A cache hit is fast without checking less (issue 12).

- Generated code is shared between identical graphs of one binding: one compiled ``forward``
  function per distinct graph, while every graph keeps its own class; graphs whose code text
  is the same but whose globals name other objects (write guards, targets) never share.
- Patching one of several identical layers patches that layer only.
- The JSON limits and JSON Schema of a blob run once per digest (remembered in the per-user
  local tier, under the schema and allowlist versions); the loader's own checks run on every
  load, and different bytes are validated in full whatever the local tier says.

Oracles: the plain model (torch.equal, forward hooks), function identity, and whether the
validation functions actually ran (spies).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

from graphpatch_cache import CacheStore, PatchableGraph, ProbePatch, ZeroPatch, load_cached
from graphpatch_cache.artifact import format as artifact_format
from graphpatch_cache.cache.local import LocalTier
from graphpatch_cache.errors import ArtifactFormatError, DisallowedTargetError
from graphpatch_cache.runtime.bind import ModuleGraphModule
from graphpatch_cache.runtime.codegen import SharedCode
from graphpatch_cache.trust import digests, validate

from tiny_models import tiny_llama, token_inputs

pytestmark = pytest.mark.slow  # the fixtures extract Llamas


def graph_modules(pg) -> dict:
    return {name: m for name, m in pg.named_modules() if isinstance(m, ModuleGraphModule)}


def layer(pg, path: str) -> ModuleGraphModule:
    (found,) = [m for name, m in graph_modules(pg).items() if name.endswith(path)]
    return found


@pytest.fixture(scope="module")
def llama5():
    return tiny_llama(n_layer=5)


@pytest.fixture(scope="module")
def inputs():
    return token_inputs(batch=1, seq=6)


@pytest.fixture(scope="module")
def hit(llama5, inputs, tmp_path_factory):
    """A graph bound from a store entry (after the miss that wrote it)."""
    tmp = tmp_path_factory.mktemp("hits")
    store = CacheStore(tmp / "root", local_dir=tmp / "local")
    load_cached(llama5, store=store, **inputs)
    pg = load_cached(llama5, store=store, **inputs)
    assert pg.cache_stats.hits == 1
    return pg


# -- shared code ---------------------------------------------------------------------------------
def test_identical_layers_share_one_forward_function_and_keep_their_own_classes(hit, llama5, inputs):
    layers = [layer(hit, f"model.layers_{i}") for i in range(5)]
    mlps = [layer(hit, f"model.layers_{i}.mlp") for i in range(5)]
    assert len({type(m).forward for m in layers}) == 1
    assert len({type(m).forward for m in mlps}) == 1
    assert len({type(m) for m in layers + mlps}) == 10  # one class per instance, as fx makes them
    assert type(layers[0]).forward is not type(mlps[0]).forward  # different graphs: different code
    every = graph_modules(hit)
    assert len({type(m).forward for m in every.values()}) < len(every) / 2
    with torch.no_grad():
        assert torch.equal(hit(**inputs).logits, llama5(**inputs).logits)


def test_fresh_and_hit_bind_the_same_node_paths_and_share_the_same_way(hit, llama5, inputs):
    fresh = PatchableGraph(llama5, **inputs)
    assert repr(fresh.graph) == repr(hit.graph)
    assert sorted(graph_modules(fresh)) == sorted(graph_modules(hit))
    assert all(a.code == b.code for a, b in zip(graph_modules(fresh).values(), graph_modules(hit).values()))
    fresh_forwards = {type(m).forward for m in graph_modules(fresh).values()}
    assert len(fresh_forwards) == len({type(m).forward for m in graph_modules(hit).values()})


def test_patching_one_of_identical_layers_patches_that_layer_only(hit, llama5, inputs):
    seen = {}

    def zero(module, args, output):
        return torch.zeros_like(output)

    def record(module, args, output):
        seen["mlp4"] = output.detach().clone()

    handles = [llama5.model.layers[3].mlp.register_forward_hook(zero),
               llama5.model.layers[4].mlp.register_forward_hook(record)]
    try:
        with torch.no_grad():
            want = llama5(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        plain = llama5(**inputs).logits
    for pg in (hit, PatchableGraph(llama5, **inputs)):
        probe = ProbePatch()
        with torch.no_grad(), pg.patch({"model.layers_3.mlp.output": ZeroPatch(), "model.layers_4.mlp.output": probe}):
            got = pg(**inputs).logits
            assert type(layer(pg, "model.layers_3.mlp")).forward is not type(layer(pg, "model.layers_2.mlp")).forward
        assert not torch.equal(got, plain)
        assert torch.equal(got, want)
        assert torch.equal(probe.activation, seen["mlp4"])
        assert probe.activation.abs().sum() > 0  # layer 4 itself was not zeroed
        with torch.no_grad():
            assert torch.equal(pg(**inputs).logits, plain)  # leaving restores every layer
        assert len({type(layer(pg, f"model.layers_{i}.mlp")).forward for i in range(5)}) == 1


def test_twin_graphs_build_their_own_fx_graph_when_asked(llama5, inputs):
    pg = PatchableGraph(llama5, **inputs)
    first, twin = layer(pg, "model.layers_0.mlp"), layer(pg, "model.layers_3.mlp")
    assert "_graphpatch_build_graph" in twin.__dict__  # not built at binding
    assert [(n.op, n.name, n.target, str(n.args)) for n in twin.graph.nodes] == [
        (n.op, n.name, n.target, str(n.args)) for n in first.graph.nodes]
    assert "_graphpatch_build_graph" not in twin.__dict__
    assert twin.graph.owning_module is twin and twin.graph is not first.graph
    assert all(n.meta["graphpatch"] is nd.meta for n, nd in zip(twin.graph.nodes, twin._graphpatch_data.nodes))
    assert type(twin).forward is type(first).forward  # building the graph compiles nothing
    assert dict(twin.named_parameters()).keys() == dict(first.named_parameters()).keys()
    assert any(p is llama5.model.layers[3].mlp.down_proj.weight for p in twin.parameters())  # its own, no copy
    copied = copy.deepcopy(layer(pg, "model.layers_4.mlp"))
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        assert torch.equal(copied(x), llama5.model.layers[4].mlp(x))
        assert torch.equal(twin(x), llama5.model.layers[3].mlp(x))


def test_every_graph_sharing_a_forward_has_the_same_code_key(hit):
    """The oracle of sharing: graphs given one forward (by key, or as twins by their data)
    have fx graphs whose code would be the same, with the same objects behind its globals."""
    shared = SharedCode()
    by_forward: dict = {}
    for gm in graph_modules(hit).values():
        by_forward.setdefault(type(gm).forward, []).append(gm)
    assert any(len(group) > 1 for group in by_forward.values())
    for group in by_forward.values():
        keys = {shared.key(gm.graph) for gm in group}
        assert len(keys) == 1 and None not in keys


class _Writer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        h.add_(1.0)  # a write into a child's output (not a tensor this graph made): guarded, per node
        return h


class _Writers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_Writer() for _ in range(3)])

    def forward(self, x):
        for m in self.layers:
            x = m(x)
        return x


def test_graphs_with_per_node_write_guards_do_not_share_code(tmp_path):
    torch.manual_seed(0)
    model, x = _Writers().eval(), torch.randn(2, 4)
    store = CacheStore(tmp_path / "root", local_dir=tmp_path / "local")
    load_cached(model, x, store=store)
    pg = load_cached(model, x, store=store)
    writers = [layer(pg, f"layers_{i}") for i in range(3)]
    assert len({type(m).forward for m in writers}) == 3  # same code text, a guard of its own each
    assert len({m.code for m in writers}) == 1
    guards = [type(m).forward.__globals__ for m in writers]
    closures = [{v for k, v in g.items() if "guard" in k} for g in guards]
    assert all(closures) and not (closures[0] & closures[1]) and not (closures[1] & closures[2])
    assert all("_graphpatch_build_graph" not in m.__dict__ for m in writers)
    with torch.no_grad():
        assert torch.equal(pg(x), model(x))


def test_a_recompile_after_binding_generates_code_again(hit):
    gm = layer(hit, "model.layers_1.mlp")
    other = layer(hit, "model.layers_2.mlp")
    shared_forward = type(gm).forward
    assert type(other).forward is shared_forward
    gm.recompile()  # what patching does after editing a graph: fx's own code generation
    assert type(gm).forward is not shared_forward and gm.code == other.code
    assert type(other).forward is shared_forward


# -- validation once per digest ------------------------------------------------------------------
class Spy:
    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        real = getattr(module, name)

        def spy(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(module, name, spy)


def new_process(monkeypatch):
    """What a new process starts without: the loader's per-process memo of checked blobs."""
    monkeypatch.setattr(validate, "_CHECKED", {})


@pytest.fixture()
def filled(llama5, inputs, tmp_path):
    tiny = tiny_llama(n_layer=1)
    store = CacheStore(tmp_path / "root", local_dir=tmp_path / "local")
    load_cached(tiny, store=store, **inputs)
    (entry,) = store.entries()
    return tiny, tmp_path, entry


def test_schema_runs_once_per_digest_and_the_loader_checks_every_time(filled, inputs, monkeypatch):
    tiny, tmp, entry = filled
    with torch.no_grad():
        want = tiny(**inputs).logits
    for n in range(3):
        new_process(monkeypatch)
        schema, checks = Spy(monkeypatch, artifact_format, "validate_artifact"), Spy(monkeypatch, validate, "check_artifact")
        pg = load_cached(tiny, store=CacheStore(tmp / "root", local_dir=tmp / "local"), **inputs)
        assert pg.cache_stats.hits == 1
        assert schema.calls == (1 if n == 0 else 0)
        assert checks.calls >= 1
        with torch.no_grad():
            assert torch.equal(pg(**inputs).logits, want)
    assert LocalTier(tmp / "local").validated(entry.digest, digests.validation_tag())
    # without a local tier nothing is remembered: full validation
    new_process(monkeypatch)
    schema = Spy(monkeypatch, artifact_format, "validate_artifact")
    load_cached(tiny, store=CacheStore(tmp / "root", local_dir=False), **inputs)
    assert schema.calls == 1


@pytest.mark.parametrize("changed", ["schema", "allowlist", "version"])
def test_a_changed_schema_allowlist_or_release_validates_again(filled, inputs, monkeypatch, changed):
    tiny, tmp, _ = filled
    new_process(monkeypatch)
    load_cached(tiny, store=CacheStore(tmp / "root", local_dir=tmp / "local"), **inputs)  # remembered now
    new_process(monkeypatch)
    if changed == "schema":
        real = artifact_format.schema_text
        monkeypatch.setattr(artifact_format, "schema_text", lambda v=1: real(v) + " ")
        monkeypatch.setattr(artifact_format, "_TAG", [])
    elif changed == "allowlist":
        monkeypatch.setattr(digests, "ALLOWLIST_DIGEST", "0" * 64)
    else:
        monkeypatch.setattr(artifact_format, "__version__", "9.9.9")
        monkeypatch.setattr(artifact_format, "_TAG", [])
    schema = Spy(monkeypatch, artifact_format, "validate_artifact")
    pg = load_cached(tiny, store=CacheStore(tmp / "root", local_dir=tmp / "local"), **inputs)
    assert pg.cache_stats.hits == 1 and schema.calls == 1


def _blob_bytes(tmp: Path, digest: str) -> bytes:
    return (tmp / "root" / "objects" / digest[:2] / digest).read_bytes()


def test_remembered_digests_never_let_other_bytes_skip_validation(filled, inputs, monkeypatch):
    tiny, tmp, entry = filled
    new_process(monkeypatch)
    load_cached(tiny, store=CacheStore(tmp / "root", local_dir=tmp / "local"), **inputs)  # the first hit
    local = LocalTier(tmp / "local")
    good = _blob_bytes(tmp, entry.digest)
    tag = digests.validation_tag()
    assert local.validated(entry.digest, tag)
    payload = json.loads(good)
    payload["root"]["nodes"][0]["surprise"] = 1  # schema-invalid, still JSON
    tampered = json.dumps(payload, sort_keys=True).encode()
    new_process(monkeypatch)
    schema = Spy(monkeypatch, artifact_format, "validate_artifact")
    with pytest.raises(ArtifactFormatError):
        validate.read_artifact(tampered, "tampered", remembered=local)
    assert schema.calls == 1
    assert not local.validated(hashlib.sha256(tampered).hexdigest(), tag)  # a refusal is not remembered


def test_a_remembered_digest_still_gets_the_loaders_checks(filled, monkeypatch):
    """Even a record for the very bytes (say, a user's local tier claims a hostile blob passed)
    skips only the JSON Schema: the allowlist refuses the call target all the same."""
    tiny, tmp, entry = filled
    local = LocalTier(tmp / "local")
    payload = json.loads(_blob_bytes(tmp, entry.digest))

    def swap(graph):
        for nd in graph["nodes"]:
            if nd["op"] == "call_function":
                nd["target"] = "os.system"
                return True
        return any(swap(c) for c in graph["children"])

    assert swap(payload["root"])
    hostile = json.dumps(payload, sort_keys=True).encode()
    local.mark_validated(hashlib.sha256(hostile).hexdigest(), digests.validation_tag())
    new_process(monkeypatch)
    schema = Spy(monkeypatch, artifact_format, "validate_artifact")
    with pytest.raises(DisallowedTargetError):
        validate.read_artifact(hostile, "hostile", remembered=local)
    assert schema.calls == 0


def test_a_tampered_shared_blob_with_a_remembered_digest_is_a_miss_not_a_graph(filled, inputs, monkeypatch):
    tiny, tmp, entry = filled
    new_process(monkeypatch)
    load_cached(tiny, store=CacheStore(tmp / "root", local_dir=tmp / "local"), **inputs)  # remembered
    LocalTier(tmp / "local").drop_blob(entry.digest)  # the shared copy is read next
    blob = tmp / "root" / "objects" / entry.digest[:2] / entry.digest
    blob.write_bytes(blob.read_bytes().replace(b'"torch.nn.functional.linear"', b'"torch.nn.functional.relu__"', 1))
    new_process(monkeypatch)
    with pytest.warns(UserWarning, match="digest mismatch"):
        pg = load_cached(tiny, store=CacheStore(tmp / "root", local_dir=tmp / "local"), **inputs)
    assert (pg.cache_stats.hits, pg.cache_stats.misses) == (0, 1)
    with torch.no_grad():
        assert torch.equal(pg(**inputs).logits, tiny(**inputs).logits)


# -- the device look-up at binding, memoized per binding -------------------------------------------
def test_module_device_memoized_agrees_with_the_plain_walk(llama5):
    import itertools

    from accelerate import init_empty_weights

    from graphpatch_cache.runtime.devices import module_device

    def plain(module, fallback):
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if tensor.device.type != "meta":
                return tensor.device
        return fallback

    with init_empty_weights(include_buffers=False):
        meta = type(llama5)(llama5.config)
    with init_empty_weights(include_buffers=True):
        all_meta = type(llama5)(llama5.config)
    for model in (llama5, meta, all_meta):
        memo: dict = {}
        for name, module in model.named_modules():
            for fallback in (None, torch.device("cpu")):
                assert module_device(module, fallback, memo) == plain(module, fallback), name
