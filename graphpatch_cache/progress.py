"""Progress of long work (an extraction), reported on stderr while it runs.

An extraction takes seconds to minutes (almost all of it dynamo's trace); without a word a
notebook cell or a log just hangs. Extraction and the cache mark where they are (phases such
as ``dynamo trace``, and module calls done out of a total); this module draws it:

- in a Jupyter kernel: a tqdm bar (a widget where ipywidgets is installed, else a text bar
  that Jupyter redraws in place);
- where stderr is a terminal: a tqdm bar on stderr;
- otherwise (a pipe, a log file): one plain line per phase on stderr, no carriage returns,
  e.g. ``graphpatch_cache: extracting LlamaForCausalLM: dynamo trace done (12.3 s, 84/84
  module calls)``.

When it shows (first setting that applies):

1. ``ExtractionOptions(progress=False)``, ``GRAPHPATCH_CACHE_PROGRESS=0`` or inside
   ``show_progress(False)``: never.
2. ``ExtractionOptions(progress=True)``, ``GRAPHPATCH_CACHE_PROGRESS=1`` or inside
   ``show_progress(True)``: from the start.
3. Otherwise: once an extraction has run for :data:`DEFAULT_DELAY` seconds, so quick ones
   (tiny models, tests) print nothing. A cache hit extracts nothing and never prints.

Nothing here imports torch; tqdm is imported only when a bar is drawn.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Iterator, Optional, TextIO, Tuple, TypeVar

#: the environment variable: 0/off/false/no (never), 1/on/true/yes (always, at once), auto or unset
ENV = "GRAPHPATCH_CACHE_PROGRESS"
_OFF = frozenset({"0", "off", "false", "no", "never"})
_ON = frozenset({"1", "on", "true", "yes", "always"})
#: seconds an extraction runs before its progress appears, unless asked for at once
DEFAULT_DELAY = 2.0
#: the phases of one extraction, in order (a tqdm bar shows how far along this list it is;
#: a phase that does not apply is skipped, one that is retried is entered again)
PHASES = ("waiting for the cache lock", "canonical inputs", "eager recording", "dynamo trace", "splitting",
          "serialization", "opaque children", "sources and validation", "storing in the cache")
#: phases a log mentions only when they took a while (an uncontended lock is no news)
_NEWS_ONLY_IF_SLOW = frozenset({"waiting for the cache lock"})
#: seconds between two lines about one long phase when no bar is drawn (a log shows it moves)
_LINE_INTERVAL = 10.0
_TICK = 0.25
_PREFIX = "graphpatch_cache"

T = TypeVar("T")


class _Muted:
    """What ``_CURRENT`` holds inside :func:`muted`: extractions nested there report nothing."""


_MUTED = _Muted()
#: the task of the extraction running in this thread (or _MUTED)
_CURRENT: ContextVar[Any] = ContextVar("graphpatch_cache_progress", default=None)
#: ``show_progress``'s (enabled, delay)
_FORCED: ContextVar[Optional[Tuple[bool, float]]] = ContextVar("graphpatch_cache_progress_forced", default=None)


@contextmanager
def show_progress(enabled: bool = True, delay: float = 0.0) -> Iterator[None]:
    """Show (or with ``enabled=False`` hide) the progress of extractions started in this block.

    ``delay``: seconds before it appears (``0``: at once). ``ExtractionOptions(progress=...)``
    and ``GRAPHPATCH_CACHE_PROGRESS=0`` still win (see the module documentation).
    """
    token = _FORCED.set((bool(enabled), float(delay)))
    try:
        yield
    finally:
        _FORCED.reset(token)


def delay_for(option: Optional[bool]) -> Optional[float]:
    """Seconds before progress appears under the current settings, or None for never;
    ``option`` is ``ExtractionOptions.progress``."""
    env = os.environ.get(ENV, "").strip().lower()
    forced = _FORCED.get()
    if option is False or env in _OFF or (forced is not None and not forced[0]):
        return None
    if option is True or env in _ON:
        return 0.0
    if forced is not None:
        return max(0.0, forced[1])
    return DEFAULT_DELAY


def title(model_class: str, on_demand: bool = False) -> str:
    """What an extraction of a ``model_class`` is called in its progress."""
    return f"extracting {'a new graph variant of ' if on_demand else ''}{model_class}"


def in_notebook() -> bool:
    """Whether this process is a Jupyter (IPython) kernel. IPython is never imported here:
    a kernel has imported it already."""
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    if get is None:
        return False
    try:
        shell = get()
    except Exception:  # an IPython in an odd state: not a kernel we can draw in
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Lines:
    """One line per event on a stream that is no terminal (logs, pipes)."""

    def __init__(self, stream: TextIO, name: str) -> None:
        self.stream = stream
        self.name = name
        self._last_line = 0.0

    def _write(self, text: str) -> None:
        try:
            self.stream.write(f"{_PREFIX}: {self.name}: {text}\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not break an extraction
            pass
        self._last_line = time.perf_counter()

    def show(self, task: "_Task") -> None:
        self._write(f"{task.phase} ({task.elapsed():.1f} s so far)" if task.phase else "started")

    def phase_done(self, task: "_Task", seconds: float) -> None:
        if task.phase in _NEWS_ONLY_IF_SLOW and seconds < 0.5:
            return
        self._write(f"{task.phase} done ({seconds:.1f} s{task.counted(', ')})")

    def tick(self, task: "_Task") -> None:
        if task.phase and time.perf_counter() - max(self._last_line, task.phase_start) >= _LINE_INTERVAL:
            self._write(f"{task.phase}{task.counted(': ')} ({time.perf_counter() - task.phase_start:.1f} s)")

    def phase(self, task: "_Task") -> None:
        pass

    def close(self, task: "_Task", ok: bool) -> None:
        self._write(f"finished in {task.elapsed():.1f} s" if ok else f"failed after {task.elapsed():.1f} s")


class _Bar:
    """A tqdm bar over :data:`PHASES` (a terminal, or a notebook), the current phase and its
    module calls as the postfix."""

    def __init__(self, bar_class: Any, stream: TextIO, name: str, screen: Optional[Tuple[int, int]]) -> None:
        columns, rows = screen or (None, None)
        self.bar = bar_class(total=len(PHASES), desc=f"{_PREFIX}: {name}", file=stream, leave=True, ncols=columns,
                             nrows=rows,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]", mininterval=0.1)

    def show(self, task: "_Task") -> None:
        self.phase(task)

    def phase(self, task: "_Task") -> None:
        if task.phase in PHASES:
            self.bar.n = PHASES.index(task.phase)
        self.bar.set_postfix_str(f"{task.phase}{task.counted(' ')}" if task.phase else "", refresh=True)

    def phase_done(self, task: "_Task", seconds: float) -> None:
        pass

    def tick(self, task: "_Task") -> None:
        self.bar.set_postfix_str(f"{task.phase}{task.counted(' ')}" if task.phase else "", refresh=False)
        self.bar.refresh()

    def close(self, task: "_Task", ok: bool) -> None:
        if ok:
            self.bar.n = self.bar.total
        self.bar.set_postfix_str("done" if ok else "failed", refresh=False)
        self.bar.close()


def _screen(stream: TextIO) -> Tuple[int, int]:
    """The terminal's (columns, rows); a size of 0 (a fresh pseudo-terminal that was never
    given one) as 100 x 24: tqdm would take it literally and draw nothing."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return 100, 24
    return size.columns or 100, size.lines or 24


def _drawing(stream: TextIO) -> Callable[[str], Any]:
    """How a task on ``stream`` is drawn: a bar in a notebook or a terminal (when tqdm
    imports), else plain lines. Decided (and tqdm imported) by the extracting thread, so the
    drawing thread imports nothing."""
    notebook = in_notebook()
    if notebook or _isatty(stream):
        try:
            if notebook and importlib.util.find_spec("ipywidgets") is not None:
                from tqdm.notebook import tqdm as widget_bar  # optional: tqdm (a widget)
                return lambda name: _Bar(widget_bar, stream, name, None)
            from tqdm import tqdm as terminal_bar  # optional: tqdm
            if notebook:  # no widgets: a text bar, which Jupyter redraws in place (carriage returns)
                return lambda name: _Bar(terminal_bar, stream, name, (100, 24))
            screen = _screen(stream)
            return lambda name: _Bar(terminal_bar, stream, name, screen)
        except ImportError:
            pass
    return lambda name: _Lines(stream, name)


class _Task:
    """One extraction's progress: its phase, the module calls counted in it, and its drawing
    (made once it is to be shown)."""

    def __init__(self, name: str, delay: float, drawing: Callable[[str], Any]) -> None:
        self.name = name
        self.delay = delay
        self._drawing = drawing
        self.start = self.phase_start = time.perf_counter()
        self.phase: Optional[str] = None
        self.done = 0
        self.total: Optional[int] = None
        self._lock = threading.Lock()
        self._view: Any = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def counted(self, sep: str) -> str:
        """``"<sep>12/84 module calls"`` in a counted phase, else ``""``."""
        if self.total is None and not self.done:
            return ""
        of = "" if self.total is None else f"/{self.total}"
        return f"{sep}{min(self.done, self.total) if self.total is not None else self.done}{of} module calls"

    # -- lifecycle ---------------------------------------------------------------------------
    def begin(self) -> None:
        if self.delay <= 0:
            self._show()
        # one thread per extraction: shows it once the delay is over, redraws its elapsed time
        self._thread = threading.Thread(target=self._run, name="graphpatch_cache-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(_TICK if self._view is not None else max(0.0, min(_TICK, self.delay - self.elapsed()))):
            with self._lock:
                if self._view is None:
                    if self.elapsed() >= self.delay:
                        self._show()
                else:
                    self._view.tick(self)

    def _show(self) -> None:
        self._view = self._drawing(self.name)
        self._view.show(self)

    def end(self, ok: bool) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self._view is not None:
                if ok:  # (a failed phase is not done: the line says the task failed)
                    self._finish_phase()
                self._view.close(self, ok)

    # -- events --------------------------------------------------------------------------------
    def _finish_phase(self) -> None:
        if self.phase is not None and self._view is not None:
            self._view.phase_done(self, time.perf_counter() - self.phase_start)

    def enter(self, phase: str, total: Optional[int]) -> None:
        with self._lock:
            self._finish_phase()
            self.phase, self.total, self.done = phase, total, 0
            self.phase_start = time.perf_counter()
            if self._view is not None:
                self._view.phase(self)

    def step(self, n: int) -> None:
        # no lock: only the extracting thread writes it; the drawing thread reads a whole int
        self.done += n


@contextmanager
def task(name: str, option: Optional[bool] = None) -> Iterator[None]:
    """Around one extraction (or a cache miss that extracts and stores): its progress.

    Inside another task this joins it (a ``load_cached`` miss and the extraction it runs are
    one task); inside :func:`muted`, or when the settings hide it, it reports nothing."""
    if _CURRENT.get() is not None:
        yield
        return
    delay = delay_for(option)
    if delay is None:
        token = _CURRENT.set(_MUTED)
        try:
            yield
        finally:
            _CURRENT.reset(token)
        return
    current = _Task(name, delay, _drawing(sys.stderr))
    token = _CURRENT.set(current)
    ok = False
    current.begin()
    try:
        yield
        ok = True
    finally:
        _CURRENT.reset(token)
        current.end(ok)


@contextmanager
def muted() -> Iterator[None]:
    """Extractions inside report nothing of their own (an opaque module's children, which the
    outer extraction counts)."""
    token = _CURRENT.set(_MUTED)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def phase(name: str, total: Optional[int] = None) -> None:
    """The current extraction enters phase ``name`` (one of :data:`PHASES`); ``total``: the
    module calls it will count with :func:`step`."""
    current = _CURRENT.get()
    if isinstance(current, _Task):
        current.enter(name, total)


def step(n: int = 1) -> None:
    """``n`` more module calls of the current phase are done."""
    current = _CURRENT.get()
    if isinstance(current, _Task):
        current.step(n)


def counted(items: Iterable[T], name: str, total: int) -> Iterator[T]:
    """``items``, counted as each is taken, in phase ``name`` (entered now)."""
    phase(name, total)

    def each() -> Iterator[T]:
        for item in items:
            step()
            yield item

    return each()


__all__ = ["DEFAULT_DELAY", "ENV", "PHASES", "counted", "delay_for", "in_notebook", "muted", "phase", "show_progress",
           "step", "task", "title"]
