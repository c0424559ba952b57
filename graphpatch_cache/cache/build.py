"""build: an artifact from a model's configuration alone, on the meta device, no weights.

The model is instantiated under ``accelerate.init_empty_weights`` (parameters on the meta
device, so a 7B configuration needs no weight memory), extracted with example inputs made
from a signature description, and stored under the key ``load_cached`` computes later for
the real model loaded with ``from_pretrained`` in the same dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch

from ..integrations import kv_cache
from ..artifact import GraphArtifact
from ..errors import GraphPatchCacheError
from ..options import ExtractionOptions
from .keys import digest_of, key_material
from .load import CachingExtractor, store_and_inputs
from .store import CacheEntry, CacheStore


class BuildError(GraphPatchCacheError):
    """A build request cannot be carried out (unknown config class, missing package...)."""


@dataclass(frozen=True, kw_only=True)
class ExampleSignature:
    """How build() makes example inputs when none are given.

    Defaults: batch 1, 8 tokens of ``input_ids`` (random ids below the vocabulary size), no
    ``attention_mask``, ``use_cache=False``; encoder-decoder models also get
    ``decoder_input_ids`` of the same shape. ``past_length=N`` (N >= 2, with
    ``use_cache=True``) adds a key/value cache already holding N positions: the graph that
    ``pg.generate(use_cache=True)`` runs for every step after the prompt (build it with
    ``seq_len=1``, and ``attention_mask=True`` if you generate with a mask). Graphs are shape-generic, so any batch size and
    sequence length of at least 2 reuse the same graph (sizes 1 get their own variant: build
    with ``batch_size=1`` for single-sequence use, the default).
    """

    batch_size: int = 1
    seq_len: int = 8
    attention_mask: bool = False
    use_cache: bool = False
    past_length: int = 0

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
        if getattr(config, "use_cache", None) is not None or self.use_cache:
            inputs["use_cache"] = self.use_cache
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


def _model_class(config: Any, model_class: Any) -> Any:
    import transformers

    if model_class is not None:
        if isinstance(model_class, str):
            found = getattr(transformers, model_class, None)
            if found is None:
                raise BuildError(f"transformers has no model class {model_class!r}",
                                 hint="pass the class itself, or a name such as 'LlamaForCausalLM'")
            return found
        return model_class
    for name in getattr(config, "architectures", None) or []:
        found = getattr(transformers, name, None)
        if found is not None:
            return found
    try:
        transformers.AutoModelForCausalLM._model_mapping[type(config)]
        return transformers.AutoModelForCausalLM
    except KeyError:
        return transformers.AutoModel


def meta_model(
    config: Any,
    *,
    model_class: Any = None,
    dtype: Optional[torch.dtype] = None,
    quantization: Optional[str] = None,
    attn_implementation: Optional[str] = None,
) -> torch.nn.Module:
    """Instantiate the model for ``config`` on the meta device (no weight memory), as
    ``from_pretrained`` would lay it out: same class, dtype, attention, tied weights."""
    try:
        import transformers
        from accelerate import init_empty_weights
    except ImportError as exc:
        raise BuildError("build() needs transformers and accelerate",
                         hint="pip install 'graphpatch-cache[transformers]'") from exc
    if not isinstance(config, transformers.PretrainedConfig):
        raise BuildError(f"build() takes a transformers config or model class, got {type(config).__name__}",
                         hint="e.g. build(LlamaConfig(...)) or build('path/to/dir/with/config.json') in the CLI")
    if quantization not in (None, "8bit"):
        raise BuildError(f"unknown quantization {quantization!r}", hint="use quantization='8bit' or None")
    cls = _model_class(config, model_class)
    kwargs: Dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        with init_empty_weights(include_buffers=False):
            if hasattr(cls, "from_config"):
                model = cls.from_config(config, **kwargs)
            else:
                model = cls._from_config(config, **kwargs)
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildError(
            f"transformers cannot build a model for {type(config).__name__} ({exc})".splitlines()[0],
            hint="pass model_class= (a transformers model class for this config), or register the config "
            "with the transformers Auto classes",
        ) from exc
    if quantization == "8bit":
        from ..integrations import bitsandbytes

        try:
            model = bitsandbytes.quantize_8bit_on_meta(model)
        except GraphPatchCacheError as exc:
            raise BuildError(exc.message, hint=exc.hint) from exc
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


#: device_map values that name a placement strategy rather than devices
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(model: torch.nn.Module, device_map: Any) -> None:
    """Check a ``device_map`` (as ``from_pretrained`` takes it) against ``model``: every key
    names a module or tensor of the model ("" for all of it), every value is a device (an
    index, ``"cpu"``, ``"cuda:1"``, ``"disk"``, ...), and every parameter is placed.

    :raises BuildError: naming the first problem (unknown names come with close matches).
    """
    from ..errors import close_matches

    if device_map is None or (isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES):
        return
    if not isinstance(device_map, dict):
        device_map = {"": device_map}
    modules = {name for name, _ in model.named_modules()}
    tensors = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    for key, device in device_map.items():
        if not isinstance(key, str) or (key and key not in modules and key not in tensors):
            matches = close_matches(str(key), sorted(modules | tensors))
            raise BuildError(
                f"device_map names {key!r}, which is not a module or tensor of {type(model).__name__}",
                hint=("close matches: " + ", ".join(matches)) if matches
                else "keys are module names as in model.named_modules(), e.g. 'model.layers.0'",
            )
        if device == "disk" or (isinstance(device, int) and not isinstance(device, bool) and device >= 0):
            continue
        try:
            torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise BuildError(f"device_map puts {key or 'the model'!r} on {device!r}, which is not a device",
                             hint="use a GPU index (0), 'cpu', 'disk', or a device string such as 'cuda:1'") from None
    placed = sorted(device_map, key=len)
    for name in sorted({name for name, _ in model.named_parameters()}):
        if not any(k == "" or name == k or name.startswith(k + ".") for k in placed):
            owner = name.rpartition(".")[0]
            raise BuildError(f"device_map places no device for {name!r}",
                             hint=f"add {owner or name!r} (or a module above it) to the device_map")


def build(
    config_or_model_class: Any,
    *example_args: Any,
    dtype: Optional[torch.dtype] = None,
    quantization: Optional[str] = None,
    cache: Union[CacheStore, str, None] = None,
    store: Union[CacheStore, str, None] = None,
    options: Optional[ExtractionOptions] = None,
    signature: Optional[ExampleSignature] = None,
    model_class: Any = None,
    attn_implementation: Optional[str] = None,
    device_map: Any = None,
    force: bool = False,
    **example_kwargs: Any,
) -> BuildResult:
    """Build and store the artifact for a model described by its config alone.

    :param config_or_model_class: a ``PretrainedConfig`` (or a model class: its default config).
    :param example_args: example inputs; without any, ``signature`` describes them.
    :param dtype: the dtype the real model will be loaded in (``from_pretrained(dtype=...)``).
    :param quantization: ``"8bit"`` for ``BitsAndBytesConfig(load_in_8bit=True)`` models.
    :param cache: the graph cache (a CacheStore, a root directory, None for the default);
        see :func:`~graphpatch_cache.load_cached` for ``cache=`` vs. a model's ``cache``.
    :param store: the graph cache, as ``cache``; with it, ``cache=`` is a model input.
    :param device_map: the ``device_map`` the real model will be loaded with. Graphs do not
        depend on devices (one entry serves every map), so it is only checked, early: a map
        naming a module the model lacks fails here rather than after loading the weights.
    :param force: extract even when the cache already has the artifact.
    :raises BuildError: unknown config class, missing packages, a device_map that does not
        fit the model; nothing is written then.
    """
    config = config_or_model_class
    if isinstance(config, type):
        model_class = model_class or config
        config_class = getattr(config, "config_class", None)
        if config_class is None:
            raise BuildError(f"{config.__name__} has no config_class", hint="pass a config instance")
        config = config_class()
    start = time.perf_counter()
    model = meta_model(config, model_class=model_class, dtype=dtype, quantization=quantization,
                       attn_implementation=attn_implementation)
    check_device_map(model, device_map)
    options = options or ExtractionOptions()
    graph_store, example_kwargs = store_and_inputs(cache, store, example_kwargs)
    if not example_args and not example_kwargs:
        example_kwargs = (signature or ExampleSignature()).inputs(model.config, model)
    store = graph_store
    material = key_material(model, example_args, example_kwargs, options)
    key = digest_of(material)
    extractor = CachingExtractor(store)
    if force:
        from ..compose import default_extractor
        from ..live.inputs import canonical_inputs, concrete_signature

        artifact = default_extractor(model, example_args, example_kwargs, options)
        inputs = canonical_inputs(model, tuple(example_args), dict(example_kwargs))
        store.put(key, artifact, material=material, example=concrete_signature(inputs))
        cached = False
    else:
        artifact = extractor(model, example_args, example_kwargs, options)
        cached = extractor.stats.hits > 0
    entry = next((e for e in store.variants(key) if e.signature == artifact.signature), None)
    return BuildResult(key=key, artifact=artifact, entry=entry, seconds=time.perf_counter() - start, cached=cached)


__all__ = ["BuildError", "BuildResult", "DEVICE_MAP_STRATEGIES", "ExampleSignature", "build", "check_device_map",
           "meta_model"]
