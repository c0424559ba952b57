"""Options shared by several commands, defined once (pip-tools' ``options.py`` style).

Every command takes ``--cache-dir``, ``--json`` and ``-v``; ``build`` and ``show`` share the
options that pick a model's graph (``--dtype``, ``--load-in-8bit``, ``--batch-size``,
``--seq-len``), so ``show MODEL`` finds exactly the key ``build MODEL`` wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import click

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

cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Cache root. Default: $GRAPHPATCH_CACHE_DIR, else the user cache directory.",
)


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--cache-dir``, ``--json`` and ``-v``."""
    return cache_dir_option(json_option(verbose_option(fn)))


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options that, with MODEL, determine a graph's key."""
    options = [
        click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
                     help="The dtype the real model is loaded in. auto: the config's dtype, else float32 "
                          "(what from_pretrained does)."),
        click.option("--load-in-8bit", is_flag=True,
                     help="For models loaded with BitsAndBytesConfig(load_in_8bit=True)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Example batch size. 1 gets its own graph; any size >= 2 shares one."),
        click.option("--seq-len", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Example sequence length. 1 gets its own graph; any length >= 2 shares one."),
        click.option("--attention-mask", is_flag=True,
                     help="The example passes an attention_mask (as pg.generate(ids, attention_mask=...) does)."),
        click.option("--use-cache", is_flag=True,
                     help="The example passes use_cache=True: the graph returns the key/value cache "
                          "(the prompt step of cached generation)."),
        click.option("--past-length", type=click.IntRange(min=0), default=0, show_default=True,
                     help="With --use-cache: the example also passes a key/value cache holding this many "
                          "positions (>= 2): the per-token graph of cached generation (use --seq-len 1)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


class _Parsed(click.ParamType):
    """A value read by one of the store's parsers (its ValueError becomes a usage error)."""

    def __init__(self, name: str, parser_name: str) -> None:
        self.name = name
        self._parser_name = parser_name

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        from graphpatch_cache.cache import store

        try:
            return getattr(store, self._parser_name)(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


#: ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` -> seconds
DURATION = _Parsed("duration", "parse_duration")
#: ``5GB``, ``500MB``, ``2GiB``, ``1024`` -> bytes (powers of 1024)
SIZE = _Parsed("size", "parse_size")


def open_store(cache_dir: Optional[Path]) -> Any:
    """The :class:`~graphpatch_cache.CacheStore` at ``cache_dir`` (or the default root)."""
    from graphpatch_cache import CacheStore

    return CacheStore(cache_dir)


def resolve_keys(store: Any, prefixes: Any) -> list:
    """Full keys for key prefixes (each must match exactly one key)."""
    out = []
    for prefix in prefixes:
        key = store.resolve(prefix)
        if key not in out:
            out.append(key)
    return out


def is_verbose(ctx: Optional[click.Context] = None) -> bool:
    ctx = ctx or click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(VERBOSE_KEY))


__all__ = ["DTYPES", "DURATION", "SIZE", "cache_dir_option", "common_options", "is_verbose", "json_option",
           "model_options", "open_store", "resolve_keys", "verbose_option"]
