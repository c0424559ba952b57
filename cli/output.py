"""How commands print: JSON documents, tables, sizes, times, and progress on a terminal.

Results go to stdout; progress, notes and warnings go to stderr, so ``--json`` output and
pipes stay clean. The bars here (gc, verify) are drawn only when stderr is a terminal and
``--json`` is off; an extraction's progress is the library's (``graphpatch_cache.show_progress``:
a bar on a terminal, one line per phase in a pipe or log).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import sys
from typing import Any, Callable, Iterator, List, Optional, Sequence

import click


def emit_json(data: Any) -> None:
    """One JSON document on stdout: 2-space indent, sorted keys."""
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def note(message: str) -> None:
    click.echo(message, err=True)


def human_size(n: Optional[int]) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def iso_time(timestamp: float) -> str:
    """UTC, second precision: ``2025-01-31T12:00:00Z``."""
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def local_time(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def table(headers: Sequence[str], rows: List[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def short_class(qualified: str) -> str:
    return qualified.rpartition(".")[2]


# -- progress ------------------------------------------------------------------------------------
def progress_enabled(as_json: bool) -> bool:
    if as_json:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """``fn(done, total)`` drawing a click progress bar on stderr once the total is known."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self._bar: Any = None
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self._bar.__enter__()
        self._bar.update(done - self._done)
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@contextlib.contextmanager
def progress(label: str, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    bar = Progress(label, enabled)
    try:
        yield bar
    finally:
        bar.close()


__all__ = ["Progress", "emit_json", "human_size", "iso_time", "local_time", "note", "progress", "progress_enabled",
           "short_class", "table"]
