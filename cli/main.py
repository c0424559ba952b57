"""The ``graphpatch-cache`` click group, and the one place library errors become exit codes.

Exit status: 0 success, 1 a library error (:class:`~graphpatch_cache.GraphPatchCacheError`,
an ``OSError``, or ``verify`` finding problems), 2 a usage error (click's own). An error is
one line and a hint on stderr; ``-v`` adds the traceback.
"""

from __future__ import annotations

import errno
import sys
import traceback
import warnings
from typing import Any, List, Optional

import click

from graphpatch_cache.errors import GraphPatchCacheError

from .build import build
from .diff import diff
from .export import export, import_
from .gc import gc
from .info import info
from .ls import ls
from .options import VERBOSE_KEY, is_verbose, verbose_option
from .rm import rm
from .show import show
from .sync import sync
from .verify import verify

#: the library's own warnings start with this; other libraries' warnings show with -v only
_LIBRARY_WARNING_PREFIX = "graphpatch_cache:"


class LibraryError(click.ClickException):
    """A library error as click shows it: ``Error: <one line>`` then ``Hint: <hint>``."""

    exit_code = 1

    def __init__(self, message: str, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.hint = hint

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True)
        if self.hint:
            click.echo(f"Hint: {self.hint}", err=True)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def translate(exc: BaseException) -> LibraryError:
    """The CLI's view of an exception raised by a command."""
    if isinstance(exc, GraphPatchCacheError):
        return LibraryError(_one_line(exc.message), exc.hint and _one_line(exc.hint))
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        hint = {
            errno.EACCES: "check the permissions of the cache directory, or pass --cache-dir",
            errno.EROFS: "the cache is on a read-only filesystem; pass --cache-dir somewhere writable",
            errno.ENOSPC: "free some space, e.g. with `graphpatch-cache gc --max-size 5GB`",
            errno.ENOENT: "check the path",
        }.get(exc.errno or -1)
        return LibraryError(_one_line(f"{exc.strerror or exc}{where}"), hint)
    return LibraryError(_one_line(f"unexpected {type(exc).__name__}: {exc}"),
                        "this is a bug: rerun with -v for the traceback and report it")


class Group(click.Group):
    """Runs commands with warnings routed to stderr and library errors translated."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
                raise
            except Exception as exc:
                if ctx.meta.get(VERBOSE_KEY):
                    traceback.print_exc(file=sys.stderr)
                raise translate(exc) from exc


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    text = str(message)
    if text.startswith(_LIBRARY_WARNING_PREFIX):
        click.echo(f"Warning: {_one_line(text[len(_LIBRARY_WARNING_PREFIX):])}", err=True)
    elif is_verbose():
        click.echo(f"Warning: {_one_line(text)} ({category.__name__}, {filename}:{lineno})", err=True)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphpatch-cache", prog_name="graphpatch-cache")
@verbose_option
def cli() -> None:
    """Build, inspect, verify, share and clean up graphpatch-cache graph artifacts.

    A graph is extracted from a model's configuration alone (on the meta device, no
    weights) and stored in a content-addressed cache, where load_cached() finds it for the
    real model. Wherever a KEY is asked for, any unique prefix of it will do.

    \b
    Exit status: 0 success, 1 a library error (or verify finding problems), 2 a usage error.

    \b
    Examples:
      graphpatch-cache build llama-7b
      graphpatch-cache ls
      graphpatch-cache show llama-7b model.layers_0.mlp
      graphpatch-cache diff old.graphs.json llama-7b
      graphpatch-cache verify --fix
      graphpatch-cache gc --older-than 30d --max-size 5GB
      graphpatch-cache sync ~/.cache/graphpatch-cache/store s3://bucket/graphs
    """


for _command in (build, ls, show, diff, verify, gc, rm, export, import_, sync, info):
    cli.add_command(_command)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of ``graphpatch-cache`` and ``python -m graphpatch_cache``."""
    cli.main(args=argv, prog_name="graphpatch-cache")


__all__ = ["LibraryError", "cli", "main", "translate"]
