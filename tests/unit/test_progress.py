"""When an extraction's progress shows (graphpatch_cache.progress): the settings' precedence,
and the option staying out of the cache key. No extraction runs here (see
tests/integration/test_progress.py for what is printed)."""

from __future__ import annotations

import io
import time

import pytest

from graphpatch_cache import ExtractionOptions, show_progress
from graphpatch_cache import progress


@pytest.fixture(autouse=True)
def _no_setting(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)


def test_default_shows_only_long_extractions():
    assert progress.delay_for(None) == progress.DEFAULT_DELAY == 2.0


@pytest.mark.parametrize("value", ["0", "off", "False", " no "])
def test_the_environment_turns_it_off_over_everything(monkeypatch, value):
    monkeypatch.setenv(progress.ENV, value)
    assert progress.delay_for(None) is None
    assert progress.delay_for(True) is None
    with show_progress(True):
        assert progress.delay_for(None) is None


@pytest.mark.parametrize("value", ["1", "on", "TRUE", "yes"])
def test_the_environment_shows_it_at_once(monkeypatch, value):
    monkeypatch.setenv(progress.ENV, value)
    assert progress.delay_for(None) == 0.0
    assert progress.delay_for(False) is None  # the option's False still wins


def test_show_progress_and_the_option():
    with show_progress():
        assert progress.delay_for(None) == 0.0
        assert progress.delay_for(False) is None
        with show_progress(False):
            assert progress.delay_for(None) is None
            assert progress.delay_for(True) is None
        with show_progress(delay=5):
            assert progress.delay_for(None) == 5.0
    assert progress.delay_for(None) == progress.DEFAULT_DELAY
    assert progress.delay_for(True) == 0.0


def test_the_option_is_not_part_of_the_cache_key():
    assert ExtractionOptions(progress=True).fingerprint() == ExtractionOptions().fingerprint()
    assert ExtractionOptions(progress=False).fingerprint() == ExtractionOptions().fingerprint()
    assert "progress" not in ExtractionOptions().fingerprint()
    with pytest.raises(TypeError, match="progress"):
        ExtractionOptions(progress="yes")


def test_a_task_in_a_log_writes_one_line_per_phase(monkeypatch):
    """No torch: the drawing of a task whose phases are marked by hand, on a stream that is
    no terminal."""
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    with progress.task("extracting Thing", True):
        progress.phase("eager recording")
        progress.phase("dynamo trace", 3)
        for _ in range(3):
            progress.step()
        with progress.muted():
            progress.phase("splitting")  # muted: not this task's
        list(progress.counted(range(2), "splitting", 2))
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "graphpatch_cache: extracting Thing: started"
    assert lines[1].startswith("graphpatch_cache: extracting Thing: eager recording done (")
    assert lines[2].startswith("graphpatch_cache: extracting Thing: dynamo trace done (")
    assert lines[2].endswith(", 3/3 module calls)")
    assert lines[3].endswith(", 2/2 module calls)") and "splitting done" in lines[3]
    assert lines[4].startswith("graphpatch_cache: extracting Thing: finished in ")
    assert len(lines) == 5


def test_a_failed_task_says_so(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    with pytest.raises(KeyError):
        with progress.task("extracting Thing", True):
            progress.phase("dynamo trace")
            raise KeyError("boom")
    assert stream.getvalue().splitlines()[-1].startswith("graphpatch_cache: extracting Thing: failed after ")


def test_a_long_phase_in_a_log_says_it_moves(monkeypatch):
    """A log gets a line about a running phase now and then (every 10 s; here 0.05 s), with
    the module calls counted so far."""
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr(progress, "_LINE_INTERVAL", 0.05)
    monkeypatch.setattr(progress, "_TICK", 0.01)
    with progress.task("extracting Thing", True):
        progress.phase("dynamo trace", 10)
        progress.step(3)
        deadline = time.monotonic() + 30
        while "3/10" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "graphpatch_cache: extracting Thing: dynamo trace: 3/10 module calls (" in stream.getvalue()
