"""Greedy generation of an encoder-decoder model (T5, BART, Whisper) through a
:class:`~graphpatch_cache.runtime.patchable_graph.PatchableGraph` (``pg.generate``).

As ``model.generate`` does, the encoder runs once: the first step calls the graph as the model
is called, with its inputs and the decoder's start token, so the encoder's graph runs (and
its patches apply) in that step, which returns the encoder's last hidden state. Each later
step passes ``encoder_outputs=(hidden,)``, so the model skips its encoder; with a key/value
cache the step feeds one token and the model's ``EncoderDecoderCache`` (self-attention and
cross-attention keys and values, see :mod:`graphpatch_cache.integrations.kv_cache`) through
the graph. A patch on a node of the encoder is absent from those steps' graphs, as the
encoder is: they do not refuse it (:func:`skipping`).

Graph variants with a cache: the first step, the second (the self-attention cache holds one
token, a size dynamo specializes) and one shape-generic variant for every later step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set

import torch

from ..errors import SignatureMismatchError, UnsupportedCacheError
from ..integrations import kv_cache

#: generation settings whose logits processors ``pg.generate`` does not apply, with the
#: value that turns each off (model.generate would apply them: the tokens would differ)
_NOT_APPLIED = {"no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
                "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
                "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "bad_words_ids": (None,),
                "sequence_bias": (None,), "forced_decoder_ids": (None,), "min_length": (None, 0),
                "min_new_tokens": (None, 0), "num_beams": (None, 1)}


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    """A transformers encoder-decoder model (its config says so, and it has an encoder)."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False)) and callable(getattr(model, "get_encoder", None))


def generate(pg: Any, inputs: torch.Tensor, mask: Optional[torch.Tensor], max_new_tokens: int, use_cache: bool,
             eos: Set[int], pad_token_id: Optional[int], config: Any, model_kwargs: Dict[str, Any]) -> torch.Tensor:
    """The decoder's sequences (the start token, then the new tokens), as ``model.generate``
    returns them for an encoder-decoder model. ``inputs``: the model's main input
    (``input_ids``; ``input_features`` for Whisper).

    :raises SignatureMismatchError: no decoder start token, or a generation setting whose
        logits processor this loop does not apply.
    :raises UnsupportedCacheError: ``use_cache=True`` and the model returned no cache.
    """
    model = pg.model
    _check_settings(config)
    dec = torch.full((inputs.shape[0], 1), _start_token(config, model), dtype=torch.long, device=inputs.device)
    kwargs = dict(model_kwargs, use_cache=use_cache)
    if mask is not None:
        kwargs["attention_mask"] = mask
    out = pg(**{model.main_input_name: inputs}, decoder_input_ids=dec, **kwargs)
    kwargs["encoder_outputs"] = (out.encoder_last_hidden_state,)
    done = torch.zeros(dec.shape[0], dtype=torch.bool, device=dec.device)
    with skipping(pg, _encoder_graphs(pg)):
        for step in range(max_new_tokens):
            if step:
                out = pg(decoder_input_ids=dec[:, -1:] if use_cache else dec, **kwargs)
            if use_cache:
                kwargs["cache"] = _returned_cache(model, out)
            token = _forced(config, step, max_new_tokens, out.logits[:, -1, :].argmax(dim=-1))
            if eos and pad_token_id is not None:
                token = torch.where(done, torch.full_like(token, pad_token_id), token)
            dec = torch.cat([dec, token[:, None]], dim=-1)
            if eos:
                done = done | torch.isin(token, torch.tensor(sorted(eos), device=token.device))
                if bool(done.all()):
                    break
    return dec


@contextlib.contextmanager
def skipping(pg: Any, paths: Sequence[str]) -> Iterator[None]:
    """Calls of ``pg`` inside do not refuse patches on the graphs at ``paths`` (and below)
    that their graphs lack: an encoder-decoder model skips its encoder when given its outputs."""
    saved, pg._skipped = pg._skipped, tuple(p + "." for p in paths)
    try:
        yield
    finally:
        pg._skipped = saved


def _check_settings(config: Any) -> None:
    for name, off in _NOT_APPLIED.items():
        value = getattr(config, name, None)
        if value not in off and not (isinstance(value, (list, tuple)) and not value):
            raise SignatureMismatchError(
                f"pg.generate() does not apply the generation setting {name}={value!r} (model.generate "
                f"would, so the tokens would differ)",
                hint=f"set pg.generation_config.{name} = None (and pass {name}=None to model.generate to compare)")


def _start_token(config: Any, model: torch.nn.Module) -> int:
    """The decoder's start token, as ``model.generate`` takes it."""
    for source in (config, getattr(model, "config", None)):
        for name in ("decoder_start_token_id", "bos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, int):
                return value
    raise SignatureMismatchError(f"{type(model).__name__} has no decoder start token",
                                 hint="set pg.generation_config.decoder_start_token_id")


def _forced(config: Any, step: int, max_new_tokens: int, token: torch.Tensor) -> torch.Tensor:
    """``forced_bos_token_id`` on the first new token, ``forced_eos_token_id`` on the last
    (transformers' ForcedBOS/ForcedEOSTokenLogitsProcessor: the one allowed token wins; of
    several end tokens, argmax takes the smallest)."""
    forced = getattr(config, "forced_bos_token_id", None) if step == 0 else None
    if step == max_new_tokens - 1 and getattr(config, "forced_eos_token_id", None) is not None:
        ids = config.forced_eos_token_id
        forced = ids if isinstance(ids, int) else min(ids)
    return token if forced is None else torch.full_like(token, forced)


def _encoder_graphs(pg: Any) -> List[str]:
    """The graph paths of the encoder's calls in any variant (the later steps' graphs lack them)."""
    encoder = pg.model.get_encoder()
    name = next((n for n, m in pg.model.named_modules() if m is encoder), None)
    paths: List[str] = []
    for artifact in pg.variants:
        todo = [("", artifact.root)]
        while todo:
            path, graph = todo.pop()
            if graph.module_path == name:
                paths.append(path)
                continue
            todo.extend(((f"{path}.{c.name}" if path else c.name), c) for c in graph.children)
    return paths


def _returned_cache(model: torch.nn.Module, out: Any) -> Any:
    cache = next(iter(kv_cache.caches_in(out)), None)
    if cache is None:
        raise UnsupportedCacheError(f"{type(model).__name__} returned no key/value cache for use_cache=True",
                                    cache_class=type(model).__name__, hint="call pg.generate(..., use_cache=False)")
    return cache


__all__ = ["generate", "is_encoder_decoder"]
