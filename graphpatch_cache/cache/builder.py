"""build: an artifact from a model's configuration alone, on the meta device, no weights.

The model is instantiated under ``accelerate.init_empty_weights`` (parameters on the meta
device, so a 7B configuration needs no weight memory), extracted with example inputs made
from a signature description, and stored under the key ``load_cached`` computes later for
the real model loaded with ``from_pretrained`` in the same dtype.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ..artifact import GraphArtifact
from ..compose import extract
from ..errors import BuildError
from ..integrations import kv_cache
from ..integrations.transformers import DEVICE_MAP_STRATEGIES, check_device_map, meta_model
from ..live.inputs import CallInputs
from ..options import ExtractionOptions
from .keys import digest_of, key_material
from .load import CachingExtractor, StoreLike, store_and_inputs
from .records import CacheEntry
from .store import CacheStore


@dataclass(frozen=True, kw_only=True)
class ExampleSignature:
    """How build() makes example inputs when none are given.

    Defaults: batch 1, 8 tokens of ``input_ids`` (random ids below the vocabulary size), no
    ``attention_mask``, ``use_cache=False``; encoder-decoder models also get
    ``decoder_input_ids`` of the same shape. ``use_cache=None`` leaves ``use_cache`` out (the
    model's default, as a call with a tokenizer's outputs does); ``position_ids=True`` adds
    them (as ``pg.generate`` does with its mask); None adds them where ``model.forward``
    takes them. ``past_length=N`` (N >= 2, with
    ``use_cache=True``) adds a key/value cache already holding N positions: the graph that
    ``pg.generate(use_cache=True)`` runs for every step after the prompt (build it with
    ``seq_len=1``, and ``attention_mask=True`` if you generate with a mask). Graphs are shape-generic, so any batch size and
    sequence length of at least 2 reuse the same graph (sizes 1 get their own variant: build
    with ``batch_size=1`` for single-sequence use, the default).
    """

    batch_size: int = 1
    seq_len: int = 8
    attention_mask: bool = False
    use_cache: Optional[bool] = False
    past_length: int = 0
    position_ids: Optional[bool] = False

    def inputs(self, config: Any, model: Optional[torch.nn.Module] = None) -> Dict[str, Any]:
        """Example inputs for ``config``; ``model`` (on any device) makes the cache of
        ``past_length`` (by running it on a prompt of that length)."""
        vocab = int(getattr(config, "vocab_size", 2) or 2)
        g = torch.Generator().manual_seed(0)
        shape = (self.batch_size, self.seq_len)
        inputs: Dict[str, Any] = {"input_ids": torch.randint(0, vocab, shape, generator=g)}
        if self.attention_mask:  # covers the cached positions too, as in generation
            inputs["attention_mask"] = torch.ones((self.batch_size, self.past_length + self.seq_len), dtype=torch.long)
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = torch.randint(0, vocab, shape, generator=g)
        if self.use_cache is not None and (getattr(config, "use_cache", None) is not None or self.use_cache):
            inputs["use_cache"] = self.use_cache
        positions_taken = model is not None and "position_ids" in inspect.signature(model.forward).parameters
        if self.position_ids or (self.position_ids is None and positions_taken):  # what pg.generate passes
            # on the parameters' device, where the model makes its own (a meta model's rotary
            # tables mix them with meta tensors); signatures and keys ignore devices
            device = next((p.device for p in model.parameters()), None) if model is not None else None
            positions = torch.arange(self.past_length, self.past_length + self.seq_len, device=device)
            inputs["position_ids"] = positions.expand(self.batch_size, -1).clone()
        if self.past_length:
            inputs.update(self._cache(config, model, vocab, g))
        return inputs

    def _cache(self, config: Any, model: Optional[torch.nn.Module], vocab: int, g: torch.Generator) -> Dict[str, Any]:
        if not self.use_cache or self.past_length < 2:
            raise BuildError(f"past_length={self.past_length} needs use_cache=True and a length of at least 2",
                             hint="ExampleSignature(use_cache=True, past_length=8, seq_len=1) "
                                  "(CLI: --use-cache --past-length 8 --seq-len 1)")
        if model is None:
            raise BuildError("an example key/value cache is made by the model: pass it to inputs(config, model)")
        name = kv_cache.cache_argument(model.forward)
        if name is None:
            raise BuildError(f"{type(model).__name__}.forward takes no key/value cache",
                             hint="build without past_length")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        prompt = torch.randint(0, vocab, (self.batch_size, self.past_length), generator=g).to(device)
        with torch.no_grad():
            out = model(input_ids=prompt, use_cache=True)
        cache = next(iter(kv_cache.caches_in(out)), None)
        if cache is None:
            raise BuildError(f"{type(model).__name__} returned no key/value cache", hint="build without past_length")
        return {name: cache}


@dataclass(frozen=True)
class BuildResult:
    key: str
    artifact: GraphArtifact
    entry: Optional[CacheEntry]
    seconds: float
    cached: bool  # True when the artifact was already in the cache


def build(
    config_or_model_class: Any,
    *example_args: Any,
    dtype: Optional[torch.dtype] = None,
    quantization: Optional[str] = None,
    store: StoreLike = None,
    cache: Any = None,
    options: Optional[ExtractionOptions] = None,
    signature: Optional[ExampleSignature] = None,
    model_class: Any = None,
    attn_implementation: Optional[str] = None,
    device_map: Any = None,
    force: bool = False,
    origin: str = "python: build",
    **example_kwargs: Any,
) -> BuildResult:
    """Build and store the artifact for a model described by its config alone.

    :param config_or_model_class: a ``PretrainedConfig`` (or a model class: its default config).
    :param example_args: example inputs; without any, ``signature`` describes them.
    :param dtype: the dtype the real model will be loaded in (``from_pretrained(dtype=...)``).
    :param quantization: ``"8bit"`` for ``BitsAndBytesConfig(load_in_8bit=True)`` models.
    :param store: the graph store (a CacheStore, a root directory, None for the default).
    :param cache: a model input (a key/value cache), as in :func:`~graphpatch_cache.load_cached`;
        deprecated: a CacheStore or a path as ``cache=`` is the graph store (use ``store=``).
    :param device_map: the ``device_map`` the real model will be loaded with. Graphs do not
        depend on devices (one entry serves every map), so it is only checked, early: a map
        naming a module the model lacks fails here rather than after loading the weights.
    :param force: extract even when the cache already has the artifact.
    :param origin: what the entry says it was built from (``ls`` shows it; display text only).
    :raises BuildError: unknown config class, missing packages, a device_map that does not
        fit the model; nothing is written then.
    """
    start = time.perf_counter()
    model = build_model(config_or_model_class, dtype=dtype, quantization=quantization, model_class=model_class,
                        attn_implementation=attn_implementation, device_map=device_map)
    graph_store, example_kwargs = store_and_inputs(cache, store, example_kwargs, caller="build")
    if not example_args and not example_kwargs:
        example_kwargs = (signature or ExampleSignature()).inputs(model.config, model)
    inputs = CallInputs.of(model, example_args, example_kwargs)
    return build_inputs(model, inputs, graph_store, options=options, force=force, origin=origin, start=start)


def build_model(config_or_model_class: Any, *, dtype: Optional[torch.dtype] = None, quantization: Optional[str] = None,
                model_class: Any = None, attn_implementation: Optional[str] = None,
                device_map: Any = None) -> torch.nn.Module:
    """The meta-device model :func:`build` extracts (``device_map`` checked against it)."""
    config = config_or_model_class
    if isinstance(config, type):
        model_class = model_class or config
        config_class = getattr(config, "config_class", None)
        if config_class is None:
            raise BuildError(f"{config.__name__} has no config_class", hint="pass a config instance")
        config = config_class()
    model = meta_model(config, model_class=model_class, dtype=dtype, quantization=quantization,
                       attn_implementation=attn_implementation)
    check_device_map(model, device_map)
    return model


def build_inputs(model: torch.nn.Module, inputs: CallInputs, graph_store: CacheStore, *,
                 options: Optional[ExtractionOptions] = None, force: bool = False, origin: str = "python: build",
                 start: Optional[float] = None) -> BuildResult:
    """:func:`build`'s second half: the entry for ``model`` called with ``inputs``, from the
    store or extracted and stored (``force``: extracted in any case)."""
    start = time.perf_counter() if start is None else start
    options = options or ExtractionOptions()
    material = key_material(model, options=options, inputs=inputs)
    key = digest_of(material)
    if force:
        artifact = extract(model, options=options, inputs=inputs)
        graph_store.put(key, artifact, material=material, example=inputs.concrete_signature, origin=origin)
        cached = False
    else:
        extractor = CachingExtractor(graph_store, origin=origin)
        artifact = extractor.load(model, inputs, options, material=material)
        cached = extractor.stats.hits > 0
    entry = next((e for e in graph_store.variants(key) if e.signature == artifact.signature), None)
    return BuildResult(key=key, artifact=artifact, entry=entry, seconds=time.perf_counter() - start, cached=cached)


__all__ = ["BuildError", "BuildResult", "DEVICE_MAP_STRATEGIES", "ExampleSignature", "build", "build_inputs",
           "build_model", "check_device_map", "meta_model"]
