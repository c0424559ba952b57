"""What ``graphpatch-cache build MODEL`` builds by default: the calls people make.

A graph variant serves one call shape (argument names, dtypes, which sizes are free), so a
build that makes one example call serves only calls like it. The default plan
(:func:`default_call_shapes`) makes the calls a tokenizer and ``pg.generate`` make:

- ``forward``: ``input_ids`` and ``attention_mask`` (a tokenizer's outputs) with
  ``use_cache`` left out (the model's default), at batch 2 and 8 tokens, so batch size and
  length are free (any size of 2 or more);
- for a model that generates with a key/value cache (a causal LM), the two graphs of
  ``pg.generate`` on a batch: the prompt (``use_cache=True``, no cache yet: the model
  makes one) and the per-token step (one token, a cache holding earlier positions).
  ``pg.generate`` always passes a mask and, when ``forward`` takes them, ``position_ids``
  (as ``model.generate`` does);
- for each of these, the same call with one sequence, built only where no stored variant
  already serves it: the check is the cache's own look-up (the key, then the signature fit rule of
  :mod:`graphpatch_cache.artifact.signature`), so once size-1 calls share the graphs of
  larger sizes these builds are skipped without a change here.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, List, Optional

import torch

from ..artifact.signature import matches
from ..integrations import kv_cache
from ..live.inputs import CallInputs
from ..options import ExtractionOptions
from .builder import BuildResult, ExampleSignature, build_inputs, build_model
from .keys import digest_of, key_material
from .load import StoreLike, store_and_inputs
from .records import CacheEntry
from .store import CacheStore

#: the example sizes: 2 and more are symbolic in the graphs (any such size is served)
BATCH, TOKENS, PAST = 2, 8, 8


@dataclass(frozen=True)
class CallShape:
    """One call the default build makes: ``name`` (``forward``, ``generate: prompt``,
    ``generate: step``), the ``signature`` of its example, and ``single``, the same call with
    one sequence (built when no stored variant serves it)."""

    name: str
    signature: ExampleSignature
    single: Optional[ExampleSignature] = None


@dataclass(frozen=True)
class ShapeBuild:
    """What :func:`build_calls` did for one call: ``result`` (None when ``skipped``: the
    graph just built for the same call with more sequences, ``served_by``, serves it too)."""

    name: str
    signature: ExampleSignature
    result: Optional[BuildResult]
    served_by: Optional[CacheEntry] = None

    @property
    def skipped(self) -> bool:
        return self.result is None


def default_call_shapes(model: torch.nn.Module) -> List[CallShape]:
    """The calls :func:`build_calls` makes by default for ``model`` (see the module's
    docstring): what a tokenizer's outputs and ``pg.generate`` pass."""
    params = inspect.signature(model.forward).parameters
    mask = "attention_mask" in params
    forward = ExampleSignature(batch_size=BATCH, seq_len=TOKENS, attention_mask=mask, use_cache=None)
    shapes = [CallShape("forward", forward, replace(forward, batch_size=1))]
    config = getattr(model, "config", None)
    generation = getattr(model, "generation_config", None)
    if generation is None or getattr(config, "is_encoder_decoder", False):
        return shapes
    positions = mask and "position_ids" in params  # pg.generate passes them with its mask
    if kv_cache.cache_argument(model.forward) is not None and getattr(generation, "use_cache", True) is not False:
        prompt = ExampleSignature(batch_size=BATCH, seq_len=TOKENS, attention_mask=mask, use_cache=True)
        step = replace(prompt, seq_len=1, past_length=PAST)
        prompt, step = replace(prompt, position_ids=positions), replace(step, position_ids=positions)
        shapes.append(CallShape("generate: prompt", prompt, replace(prompt, batch_size=1)))
        shapes.append(CallShape("generate: step", step, replace(step, batch_size=1)))
    else:  # every step runs the whole sequence through one graph
        steps = ExampleSignature(batch_size=BATCH, seq_len=TOKENS, attention_mask=mask, use_cache=False)
        steps = replace(steps, position_ids=positions)
        shapes.append(CallShape("generate", steps, replace(steps, batch_size=1)))
    return shapes


def serving_entry(store: CacheStore, model: torch.nn.Module, inputs: CallInputs,
                  options: Optional[ExtractionOptions] = None) -> Optional[CacheEntry]:
    """The stored variant a call with ``inputs`` would hit (its key, then the signature fit
    rule; blobs are not read), or None."""
    key = digest_of(key_material(model, options=options or ExtractionOptions(), inputs=inputs))
    concrete = inputs.concrete_signature
    return next((e for e in store.variants(key) if e.signature and matches(e.signature, concrete)), None)


def call_keys(model: torch.nn.Module, signatures: Optional[List[ExampleSignature]] = None,
              options: Optional[ExtractionOptions] = None) -> List[str]:
    """The keys the calls of ``signatures`` (default: every call of :func:`default_call_shapes`,
    one-sequence ones included) are stored under, in that order, each once; nothing is built."""
    if signatures is None:
        signatures = [s for shape in default_call_shapes(model) for s in (shape.signature, shape.single) if s]
    keys: List[str] = []
    for signature in signatures:
        inputs = CallInputs.of(model, (), signature.inputs(model.config, model))
        key = digest_of(key_material(model, options=options or ExtractionOptions(), inputs=inputs))
        if key not in keys:
            keys.append(key)
    return keys


def build_calls(
    config_or_model_class: Any,
    shapes: Optional[List[CallShape]] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    quantization: Optional[str] = None,
    store: StoreLike = None,
    options: Optional[ExtractionOptions] = None,
    model_class: Any = None,
    attn_implementation: Optional[str] = None,
    device_map: Any = None,
    force: bool = False,
    origin: str = "python: build_calls",
    progress: Optional[Callable[[str], Any]] = None,
) -> List[ShapeBuild]:
    """Build the graphs of several calls of one model from its config (arguments as
    :func:`~graphpatch_cache.build` takes them), one meta-device model for all.

    :param shapes: the calls (default: :func:`default_call_shapes`).
    :param progress: called with each call's name before it is built.
    """
    model = build_model(config_or_model_class, dtype=dtype, quantization=quantization, model_class=model_class,
                        attn_implementation=attn_implementation, device_map=device_map)
    graph_store, _ = store_and_inputs(None, store, {}, caller="build")
    out: List[ShapeBuild] = []
    for shape in shapes if shapes is not None else default_call_shapes(model):
        for name, signature in ((shape.name, shape.signature), (f"{shape.name}, one sequence", shape.single)):
            if signature is None:
                continue
            start = time.perf_counter()
            inputs = CallInputs.of(model, (), signature.inputs(model.config, model))
            main = out[-1].result if signature is shape.single and out else None
            if main is not None and main.entry is not None:
                served = serving_entry(graph_store, model, inputs, options)
                if served is not None and (served.key, served.variant) == (main.key, main.entry.variant):
                    out.append(ShapeBuild(name, signature, None, served))  # the call's own graph serves it
                    continue
            if progress is not None:
                progress(name)
            result = build_inputs(model, inputs, graph_store, options=options, force=force, origin=origin, start=start)
            out.append(ShapeBuild(name, signature, result))
    return out


__all__ = ["BATCH", "PAST", "TOKENS", "CallShape", "ShapeBuild", "build_calls", "call_keys", "default_call_shapes",
           "serving_entry"]
