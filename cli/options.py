"""Options shared by several commands, defined once (pip-tools' ``options.py`` style).

Every command takes ``--cache-dir``, ``--json`` and ``-v``; ``build`` and ``show`` share the
options that pick a model's graph (``--dtype``, ``--load-in-8bit``, ``--batch-size``,
``--seq-len``) and what they mean (:func:`model_spec`, :func:`model_keys`), so ``show MODEL``
finds exactly the key ``build MODEL`` wrote.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import click

from graphpatch_cache.cache import CacheStore, parse_duration, parse_size
from graphpatch_cache.errors import CacheMissError, GraphPatchCacheError

from .presets import resolve_model

VERBOSE_KEY = "graphpatch_cache.verbose"
JSON_KEY = "graphpatch_cache.json"

DTYPES = ("auto", "float32", "float16", "bfloat16")


def _remember(key: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value:  # ctx.meta is shared by the whole context tree: main.py reads it on errors
            ctx.meta[key] = value
        return value

    return callback


verbose_option = click.option(
    "-v", "--verbose", count=True, expose_value=False, callback=_remember(VERBOSE_KEY), is_eager=True,
    help="Show tracebacks on errors, and warnings from other libraries.",
)

json_option = click.option(
    "--json", "as_json", is_flag=True, callback=_remember(JSON_KEY),
    help="Print one JSON document on stdout (format in this help); no progress output.",
)

class _CacheRoot(click.ParamType):
    """A cache root: a directory (a ``Path``), or a URL kept as written (``s3://bucket/prefix``)."""

    name = "directory|url"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        text = str(value)
        return text if "://" in text and not text.startswith("/") else Path(text)


cache_dir_option = click.option(
    "--cache-dir", type=_CacheRoot(), default=None,
    help="Cache root: a directory, or a URL such as s3://bucket/prefix (the [s3] extra). "
         "Default: $GRAPHPATCH_CACHE_DIR, else the user cache directory.",
)


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--cache-dir``, ``--json`` and ``-v``."""
    return cache_dir_option(json_option(verbose_option(fn)))


#: the model options' defaults (a MODEL given where no model options are taken). The call-shape
#: options default to None: none given means the default build (the calls a tokenizer's outputs
#: and pg.generate make, graphpatch_cache.cache.default_call_shapes); any given: one exact call
SHAPE_OPTIONS = ("batch_size", "seq_len", "attention_mask", "use_cache", "past_length")
DEFAULT_MODEL_ARGS: Dict[str, Any] = {"dtype": "auto", "load_in_8bit": False,
                                      **{name: None for name in SHAPE_OPTIONS}}


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options that, with MODEL, determine a graph's key."""
    options = [
        click.option("--dtype", type=click.Choice(DTYPES), default=DEFAULT_MODEL_ARGS["dtype"], show_default=True,
                     help="The dtype the real model is loaded in. auto: the config's dtype, else float32 "
                          "(what from_pretrained does)."),
        click.option("--load-in-8bit", is_flag=True,
                     help="For models loaded with BitsAndBytesConfig(load_in_8bit=True)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Only the call with this batch size (default 2: any size >= 2 shares the graph; "
                          "1 gets its own)."),
        click.option("--seq-len", type=click.IntRange(min=1), default=None,
                     help="Only the call with this many tokens (default 8, or 1 with --past-length: any "
                          "length >= 2 shares the graph; 1 gets its own)."),
        click.option("--attention-mask/--no-attention-mask", default=None,
                     help="Only the call with (default) or without an attention_mask."),
        click.option("--use-cache/--no-use-cache", default=None,
                     help="Only the call passing use_cache=True (the graph returns the key/value cache: the "
                          "prompt step of cached generation) or use_cache=False (default: left out, the "
                          "model's own default)."),
        click.option("--past-length", type=click.IntRange(min=0), default=None,
                     help="Only the call that also passes a key/value cache holding this many positions "
                          "(>= 2; implies --use-cache and, by default, --seq-len 1): the per-token graph "
                          "of cached generation."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


class _Parsed(click.ParamType):  # type: ignore[type-arg]  # generic in click >= 8.2 only
    """A value read by one of the library's parsers (its ValueError becomes a usage error)."""

    def __init__(self, name: str, parser: Callable[[Any], Any]) -> None:
        self.name = name
        self._parser = parser

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        try:
            return self._parser(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


#: ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` -> seconds
DURATION = _Parsed("duration", parse_duration)
#: ``5GB``, ``500MB``, ``2GiB``, ``1024`` -> bytes (powers of 1024)
SIZE = _Parsed("size", parse_size)


def open_store(cache_dir: Union[Path, str, None]) -> CacheStore:
    """The :class:`~graphpatch_cache.CacheStore` at ``cache_dir`` (or the default root)."""
    return CacheStore(cache_dir)


def model_spec(model: str, dtype: str, load_in_8bit: bool, batch_size: Optional[int] = None,
               seq_len: Optional[int] = None, attention_mask: Optional[bool] = None, use_cache: Optional[bool] = None,
               past_length: Optional[int] = None) -> Dict[str, Any]:
    """The config, meta-model arguments and example signature for MODEL and the model options
    (``build MODEL`` and ``show MODEL``). ``signature`` is None when no call-shape option is
    given: the default build (``graphpatch_cache.cache.default_call_shapes``)."""
    resolved = resolve_model(model)  # first: a misspelt MODEL is reported before torch loads
    import torch  # deferred: only commands that pick a model import torch (ls, rm, gc answer at once)

    from graphpatch_cache.cache import ExampleSignature  # deferred: imports torch

    if not is_verbose():  # transformers' and bitsandbytes' advice is noise here; -v shows it
        # deferred: transformers loads only for commands that need a model
        from transformers.utils import logging as hf_logging

        verbosity, bnb = hf_logging.get_verbosity(), logging.getLogger("bitsandbytes")  # type: ignore[no-untyped-call]
        level = bnb.level
        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        bnb.setLevel(logging.ERROR)

        def restore() -> None:  # for this command only (the CLI may run inside a longer process)
            hf_logging.set_verbosity(verbosity)  # type: ignore[no-untyped-call]
            bnb.setLevel(level)

        context = click.get_current_context(silent=True)
        if context is not None:
            context.call_on_close(restore)
    if dtype == "auto":
        torch_dtype = getattr(resolved.config, "dtype", None) or getattr(resolved.config, "torch_dtype", None)
        if isinstance(torch_dtype, str):
            torch_dtype = getattr(torch, torch_dtype, None)
        torch_dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    signature = None
    if any(v is not None for v in (batch_size, seq_len, attention_mask, use_cache, past_length)):
        past = past_length or 0
        signature = ExampleSignature(
            batch_size=2 if batch_size is None else batch_size,
            seq_len=(1 if past else 8) if seq_len is None else seq_len,
            attention_mask=True if attention_mask is None else attention_mask,
            use_cache=(True if past else None) if use_cache is None else use_cache, past_length=past)
        if signature.use_cache and signature.attention_mask:  # pg.generate's calls: with its position ids
            signature = replace(signature, position_ids=None)
    return {
        "resolved": resolved,
        "dtype": torch_dtype,
        "quantization": "8bit" if load_in_8bit else None,
        "signature": signature,
        "origin": resolved.origin,
    }


def model_keys(spec: Dict[str, Any]) -> List[str]:
    """The keys ``build`` stores MODEL's graphs under (the first: the plain forward call),
    computed without extracting."""
    from graphpatch_cache.cache import call_keys, meta_model  # deferred: imports torch

    model = meta_model(spec["resolved"].config, dtype=spec["dtype"], quantization=spec["quantization"])
    return call_keys(model, None if spec["signature"] is None else [spec["signature"]])


_HEX = re.compile(r"^[0-9a-fA-F]+$")


def resolve_key(store: CacheStore, target: str, model_args: Optional[Dict[str, Any]] = None) -> str:
    """The full key of ``target``: a key or a unique key prefix, else a MODEL as ``build`` takes
    it (with ``model_args``, default: the model options' defaults) whose graph is cached (by
    default, the key of its plain forward call).

    :raises CacheMissError: an ambiguous prefix, or neither a key nor a cached MODEL.
    """
    return resolve_targets(store, target, model_args)[0]


def resolve_targets(store: CacheStore, target: str, model_args: Optional[Dict[str, Any]] = None) -> List[str]:
    """:func:`resolve_key`, with every key of a MODEL's build that the cache holds."""
    if _HEX.match(target):
        found = [k for k in store.keys() if k.startswith(target.lower())]
        if found:
            return [store.resolve(target)]  # (raises for an ambiguous prefix)
    try:
        spec = model_spec(target, **(model_args or DEFAULT_MODEL_ARGS))
    except GraphPatchCacheError as exc:
        if _HEX.match(target):
            raise CacheMissError(f"no cache entry with key prefix {target!r} in {store.root}", path=str(store.root),
                                 hint="list the entries with `graphpatch-cache ls`") from exc
        raise CacheMissError(f"no cache entry for {target!r}: not a key in {store.root}, and {exc.message}",
                             path=str(store.root), hint=exc.hint) from exc
    keys = model_keys(spec)
    held = [key for key in keys if store.variants(key)]
    if not held:
        raise CacheMissError(
            f"{target} is not in the cache at {store.root} (key {keys[0][:12]})", path=str(store.root),
            hint=f"build it with `graphpatch-cache build {target}` and the same model options (--dtype, "
                 "--load-in-8bit, --batch-size, --seq-len, --attention-mask, --use-cache, --past-length)",
        )
    return held


def resolve_keys(store: CacheStore, targets: Any) -> List[str]:
    """Full keys for key prefixes or MODELs (a MODEL: every key its default build wrote)."""
    out: List[str] = []
    for target in targets:
        for key in resolve_targets(store, target):
            if key not in out:
                out.append(key)
    return out


def is_verbose(ctx: Optional[click.Context] = None) -> bool:
    ctx = ctx or click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(VERBOSE_KEY))


__all__ = ["DEFAULT_MODEL_ARGS", "DTYPES", "DURATION", "SHAPE_OPTIONS", "SIZE", "cache_dir_option", "common_options",
           "is_verbose", "json_option", "model_keys", "model_options", "model_spec", "open_store", "resolve_key",
           "resolve_keys", "resolve_targets", "verbose_option"]
