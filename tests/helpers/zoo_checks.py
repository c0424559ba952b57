"""The zoo's checks, shared by ``tests/integration/test_zoo.py`` (which asserts them) and
``scripts/model_zoo.py`` (which writes the compatibility table from them).

One :class:`ZooCase` per (architecture, attention): one ``load_cached`` into its own store serves
the compile, exact, probe and zero checks; a second ``load_cached`` through a fresh local tier
must be a hit; a causal LM then generates with its key/value cache. Every check raises
``AssertionError`` (or the library's error) naming what differs; oracles are the plain model's
outputs (``torch.equal`` on every leaf) and forward pre-hooks on it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import torch

from graphpatch_cache import CacheStore, PatchableGraph, ProbePatch, ZeroPatch, load_cached
from zoo import BY_NAME, Arch, differences, example_inputs

NEW_TOKENS = 4


@dataclass
class ZooCase:
    arch: Arch
    attn: str
    model: torch.nn.Module
    inputs: Dict[str, Any]
    pg: PatchableGraph
    root: Path
    seconds: float  # the first load_cached (a miss: the extraction)


def store(root: Path, local: str = "local") -> CacheStore:
    return CacheStore(root / "root", local_dir=root / local)


def extract(name: str, attn: str, root: Path) -> ZooCase:
    """Build the tiny model and ``load_cached`` it into a new store under ``root`` (a miss)."""
    arch = BY_NAME[name]
    model = arch.build(attn)
    assert model.config._attn_implementation == attn
    inputs = example_inputs(arch)
    start = time.perf_counter()
    pg = load_cached(model, store=store(root), **inputs)
    seconds = time.perf_counter() - start
    assert (pg.cache_stats.hits, pg.cache_stats.misses) == (0, 1)
    return ZooCase(arch, attn, model, inputs, pg, root, seconds)


def check_compiled(case: ZooCase) -> None:
    """No module of any variant fell back to an opaque call."""
    for artifact in case.pg.variants:
        opaque = {g.module_path: artifact.extraction["opaque"].get(g.module_path, "")
                  for g in artifact.root.walk() if g.kind == "opaque"}
        opaque.update(artifact.extraction["opaque"])
        assert not opaque, f"opaque modules: {opaque}"


def _outputs(fn: Any, inputs: Dict[str, Any]) -> Any:
    with torch.no_grad():
        return fn(**inputs)


def check_exact(case: ZooCase) -> None:
    """Every output leaf equals the plain model's, on the example and at another batch size and
    length (served by the same graph: shape-generic)."""
    before = len(case.pg.variants)
    for batch, seq in ((2, 8), (3, 5)):
        inputs = example_inputs(case.arch, batch, seq, seed=seq)
        diff = differences(_outputs(case.pg, inputs), _outputs(case.model, inputs))
        assert not diff, f"at ({batch}, {seq}): {diff}"
    assert len(case.pg.variants) == before, "another shape needed a graph of its own"


def check_probe_and_zero(case: ZooCase) -> None:
    """A probe on the middle layer's MLP value sees what a pre-hook on the plain model sees;
    zeroing it changes every output leaf as zeroing it by a pre-hook does."""
    module = case.model.get_submodule(case.arch.module)
    seen: List[torch.Tensor] = []
    zero_call = [0]  # the call to zero (1-based; 0: none): the node is the module's last call

    def hook(mod: Any, args: Any, kwargs: Any) -> Any:
        value = args[0] if args else kwargs["hidden_states"]
        seen.append(value.detach().clone())
        if len(seen) != zero_call[0]:
            return None
        if args:
            return (torch.zeros_like(value), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": torch.zeros_like(value)}

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        plain = _outputs(case.model, case.inputs)
        zero_call[0], calls = len(seen), list(seen)
        seen.clear()
        zeroed = _outputs(case.model, case.inputs)
    finally:
        handle.remove()
    probe = ProbePatch()
    with case.pg.patch({case.arch.node: probe}):
        probed = _outputs(case.pg, case.inputs)
    assert torch.equal(probe.activation, calls[-1])
    assert not differences(probed, plain), "a probe changed the output"
    with case.pg.patch({case.arch.node: ZeroPatch()}):
        got = _outputs(case.pg, case.inputs)
    assert differences(zeroed, plain), "zeroing the value changed nothing in the plain model"
    diff = differences(got, zeroed)
    assert not diff, f"zeroed: {diff}"
    assert not differences(_outputs(case.pg, case.inputs), plain), "the patch outlived its context"


def check_hit(case: ZooCase) -> float:
    """A second ``load_cached`` on the same store, through a fresh local tier (the artifact read
    back from bytes on disk and checked), is a hit and reproduces the model; returns its seconds."""
    start = time.perf_counter()
    pg = load_cached(case.model, store=store(case.root, "local-fresh"), **case.inputs)
    seconds = time.perf_counter() - start
    assert (pg.cache_stats.hits, pg.cache_stats.misses) == (1, 0)
    diff = differences(_outputs(pg, case.inputs), _outputs(case.model, case.inputs))
    assert not diff, diff
    return seconds


def check_generate(case: ZooCase) -> float:
    """``pg.generate`` with the key/value cache in use (``use_cache=True``, no warning: no
    stepping without a cache) equals ``model.generate``; the decode steps ran a graph that takes
    the cache as input. Returns the seconds of ``pg.generate`` (the decode graph's extraction
    included)."""
    ids, mask = case.inputs["input_ids"], case.inputs["attention_mask"]
    expected = case.model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   use_cache=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = case.pg.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, use_cache=True)
    seconds = time.perf_counter() - start
    assert torch.equal(got, expected), f"{got.tolist()} != {expected.tolist()}"
    takes_cache = [a for a in case.pg.variants if any(n.op == "placeholder" and n.name.startswith("cache_")
                                                      for n in a.root.nodes)]
    assert takes_cache, "no graph took the key/value cache as an input"
    return seconds


__all__ = ["NEW_TOKENS", "ZooCase", "check_compiled", "check_exact", "check_generate", "check_hit",
           "check_probe_and_zero", "extract", "store"]
