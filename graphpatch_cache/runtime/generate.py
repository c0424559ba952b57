"""Greedy generation through a :class:`~graphpatch_cache.runtime.patchable_graph.PatchableGraph`,
so active patches apply at every step (``pg.generate``; see its docstring for the contract).

With a key/value cache the prompt runs once and each later step feeds one token and the
model's cache through the graph; without one each step runs the whole sequence.
"""

from __future__ import annotations

import copy
import sys
import warnings
from typing import Any, Dict, Optional, Set, Tuple

import torch

from ..errors import SignatureMismatchError, UnsupportedCacheError
from ..integrations import kv_cache
from . import generate_encdec


def generate(
    pg: Any,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    max_new_tokens: int = 20,
    use_cache: Optional[bool] = None,
    do_sample: bool = False,
    eos_token_id: Any = None,
    pad_token_id: Optional[int] = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """``pg.generate(...)`` (which runs this under ``torch.no_grad``)."""
    if do_sample:
        raise SignatureMismatchError("pg.generate() decodes greedily", hint="pass do_sample=False")
    _check_cache_implementation(model_kwargs.pop("cache_implementation", None))
    config = pg.generation_config if pg.generation_config is not None else \
        getattr(pg.model, "generation_config", None)
    if use_cache is None:
        return _with_default_cache(pg, input_ids, attention_mask, bool(getattr(config, "use_cache", True)),
                                   max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                   pad_token_id=pad_token_id, **model_kwargs)
    cache_arg = _cache_argument(pg.model) if use_cache else None
    given_pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    eos, pad_token_id = _stop_tokens(config, eos_token_id, pad_token_id)
    if generate_encdec.is_encoder_decoder(pg.model):
        return generate_encdec.generate(pg, input_ids, attention_mask, max_new_tokens, use_cache, eos, pad_token_id,
                                        config, model_kwargs)
    if attention_mask is None and "attention_mask" in pg._forward_signature.parameters:
        attention_mask = _default_mask(input_ids, given_pad, eos)
    return _decode(pg, input_ids, attention_mask, max_new_tokens, cache_arg, eos, pad_token_id, model_kwargs)


def _default_mask(input_ids: torch.Tensor, pad_token_id: Optional[int], eos: Set[int]) -> torch.Tensor:
    """``model.generate``'s mask when none is given: 0 where the padding id appears (when there
    is one and it is no end-of-sequence id), else all ones. With it every call passes the
    mask (and the positions) a tokenizer's batch does, so they share its graphs."""
    if pad_token_id is not None and pad_token_id not in eos and bool((input_ids == pad_token_id).any()):
        return input_ids.ne(pad_token_id).long()
    return torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)


def copied_generation_config(module: torch.nn.Module) -> Tuple[Any, Any]:
    """Copies of a transformers model's ``config`` and ``generation_config`` (graphpatch's
    ``pg.config`` and ``pg.generation_config``), or (None, None) for another model."""
    if not _is_generation_model(module):
        return None, None
    try:
        return copy.deepcopy(getattr(module, "config", None)), copy.deepcopy(module.generation_config)
    except Exception as exc:  # an odd config must not stop patching; say what failed
        warnings.warn(
            f"graphpatch_cache: could not copy the model's generation config ({type(exc).__name__}: "
            f"{exc}); pg.generation_config is None and pg.generate uses the model's "
            "(ExtractionOptions(copy_transformers_generation_config=False) skips the copy)",
            stacklevel=4,  # this function, PatchableGraph._setup, __init__ or from_artifact, the caller
        )
        return None, None


def _is_generation_model(module: torch.nn.Module) -> bool:
    """A transformers model that can generate (graphpatch's test: a ``GenerationMixin``).
    transformers is not imported for this: a model of it means it already is."""
    transformers = sys.modules.get("transformers")
    mixin = getattr(transformers, "GenerationMixin", None) if transformers is not None else None
    return mixin is not None and isinstance(module, mixin) and getattr(module, "generation_config", None) is not None



def _with_default_cache(pg: Any, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], use_cache: bool,
                        **kwargs: Any) -> torch.Tensor:
    """``use_cache=None``: the config's choice, and steps without a cache (with a warning) for
    a model whose cache cannot go through a graph."""
    try:
        return generate(pg, input_ids, attention_mask, use_cache=use_cache, **kwargs)
    except UnsupportedCacheError as exc:
        # stacklevel: this function, generate, PatchableGraph.generate, torch.no_grad's wrapper, the caller
        warnings.warn(f"graphpatch_cache: generating without a key/value cache: {exc.message}", stacklevel=5)
        return generate(pg, input_ids, attention_mask, use_cache=False, **kwargs)


def _check_cache_implementation(kind: Optional[str]) -> None:
    """``cache_implementation=``: only the dynamic cache (the model's default) goes through a graph.

    Why not "static": a StaticCache writes each step's keys into preallocated buffers in place
    (``index_copy_`` at positions from a length tensor it also updates in place), and its
    sliding layers branch on a Python int, so a graph would have to write into the caller's
    buffers and keep that int; the dynamic cache gives the same tokens.
    """
    if kind is not None and kind != "dynamic":
        raise UnsupportedCacheError(
            f"pg.generate(cache_implementation={kind!r}): only the dynamic key/value cache (sliding windows "
            f"included) goes through an extracted graph; a {kind} cache is written in place into preallocated "
            f"buffers, which a graph does not follow",
            cache_class=str(kind),
            hint="leave cache_implementation out (the dynamic cache gives the same tokens), or pass use_cache=False",
        )


def _cache_argument(model: torch.nn.Module) -> str:
    """The name of the forward argument that takes the key/value cache.

    :raises UnsupportedCacheError: the model's forward takes none.
    """
    cache_arg = kv_cache.cache_argument(model.forward)
    if cache_arg is None:
        raise UnsupportedCacheError(
            f"{type(model).__name__}.forward takes no key/value cache, so "
            f"pg.generate(use_cache=True) cannot reuse one",
            cache_class=type(model).__name__,
            hint="call pg.generate(..., use_cache=False): every step then runs the whole sequence",
        )
    return cache_arg


def _stop_tokens(config: Any, eos_token_id: Any, pad_token_id: Optional[int]) -> Tuple[Set[int], Optional[int]]:
    """The end-of-sequence ids and the padding id (defaults from the generation config; the
    padding defaults to the smallest end-of-sequence id)."""
    if eos_token_id is None and config is not None:
        eos_token_id = config.eos_token_id
    if pad_token_id is None and config is not None:
        pad_token_id = config.pad_token_id
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    if pad_token_id is None and eos:
        pad_token_id = min(eos)
    return eos, pad_token_id


def _decode(pg: Any, ids: torch.Tensor, mask: Optional[torch.Tensor], max_new_tokens: int, cache_arg: Optional[str],
            eos: Set[int], pad_token_id: Optional[int], model_kwargs: Dict[str, Any]) -> torch.Tensor:
    """The greedy loop: one graph call per new token."""
    # with a mask, positions count real tokens only (model.generate passes them whenever the
    # model takes them; without padding they are the positions the model would use)
    padded = mask is not None and "position_ids" in pg._forward_signature.parameters
    cache = None
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        kwargs = _step_kwargs(model_kwargs, cache_arg, mask, padded, cache)
        out = pg(input_ids=ids if cache is None else ids[:, -1:], **kwargs)
        if cache_arg is not None:
            cache = _returned_cache(pg.model, out)
        token = out.logits[:, -1, :].argmax(dim=-1)
        if eos and pad_token_id is not None:
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
        ids = torch.cat([ids, token[:, None]], dim=-1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        if eos:
            done = done | torch.isin(token, torch.tensor(sorted(eos), device=token.device))
            if bool(done.all()):
                break
    return ids


def _step_kwargs(model_kwargs: Dict[str, Any], cache_arg: Optional[str], mask: Optional[torch.Tensor], padded: bool,
                 cache: Any) -> Dict[str, Any]:
    """One step's keyword arguments besides ``input_ids``."""
    kwargs = dict(model_kwargs, use_cache=cache_arg is not None)
    if mask is not None:
        kwargs["attention_mask"] = mask
    if padded:
        assert mask is not None
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        kwargs["position_ids"] = positions if cache is None else positions[:, -1:]
    if cache is not None:
        kwargs[cache_arg] = cache  # type: ignore[index]
    return kwargs


def _returned_cache(model: torch.nn.Module, out: Any) -> Any:
    """The key/value cache a step returned.

    :raises UnsupportedCacheError: it returned none.
    """
    cache = next(iter(kv_cache.caches_in(out)), None)
    if cache is None:
        raise UnsupportedCacheError(
            f"{type(model).__name__} returned no key/value cache for use_cache=True",
            cache_class=type(model).__name__,
            hint="call pg.generate(..., use_cache=False)",
        )
    return cache


__all__ = ["copied_generation_config", "generate"]
