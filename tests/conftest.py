"""Fixtures shared by the whole suite (fixtures only: helpers live in ``tests/helpers``).

Layout: ``tests/unit`` never runs a dynamo trace (it is the fast layer), ``tests/integration``
extracts graphs; ``tests/helpers`` holds plain modules the tests import by their bare names
(``tiny_models``: the tiny model factories and inputs; ``hand_built``: artifacts written by
hand; ``store_files``: what is on disk under a cache root; ``hostile``: the attack corpus;
``structure_modules``, ``call_name_modules``: small ``nn.Module``s; ``cli_run``: the click app
in-process; ``schema_walk``: the artifact JSON beside its schema).

Import path: this file puts ``tests/helpers`` at the front of ``sys.path`` when pytest loads it
(it always does, before any test module, whatever the rootdir or the invocation directory),
so no helper depends on pytest's ``pythonpath`` option or on the import mode. The tests run
with ``--import-mode=importlib`` (pyproject's addopts) because ``tests/unit`` and
``tests/integration`` mirror the library and so hold files of the same name.

Markers (registered in pyproject, ``--strict-markers``): ``slow`` (a test or a module whose run or
shared setup takes over about a second on a 2-core machine), ``subprocess`` (starts another
Python process), ``allowlist_refusal`` (below). ``python -m pytest -m "not slow"`` is the fast
development subset.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each (and their children)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache_dirs(tmp_path_factory):
    """No test touches the user's real cache: the default roots point into a temp dir."""
    base = tmp_path_factory.mktemp("default-cache")
    old = {k: os.environ.get(k) for k in ("GRAPHPATCH_CACHE_DIR", "GRAPHPATCH_CACHE_LOCAL_DIR")}
    os.environ["GRAPHPATCH_CACHE_DIR"] = str(base / "root")
    os.environ["GRAPHPATCH_CACHE_LOCAL_DIR"] = str(base / "local")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_REFUSED_MARKERS = ("not on the allowlist", "graphs may not read", "not an allowed torch.Tensor method")


@pytest.fixture(autouse=True)
def _allowlist_not_too_tight(request, monkeypatch):
    """Every graph the suite extracts, from every model family, must compile under the closed
    allowlist: a module left opaque because the list refused one of its ops fails the test
    that extracted it (tests that build such a graph on purpose say so with
    ``@pytest.mark.allowlist_refusal``). Extraction itself already runs the loader's checks on
    what it produces, so an artifact the loader would refuse never leaves extraction."""
    import graphpatch_cache.extraction as extraction

    if request.node.get_closest_marker("allowlist_refusal"):
        yield
        return
    original = extraction.extract
    refused = []

    def extract(*args, **kwargs):
        artifact = original(*args, **kwargs)
        refused.extend(f"{path}: {why}" for path, why in artifact.extraction.get("opaque", {}).items()
                       if any(m in why for m in _REFUSED_MARKERS))
        return artifact

    monkeypatch.setattr(extraction, "extract", extract)
    yield
    assert not refused, f"the closed allowlist refused ops of a test model (review and add them): {refused}"


@pytest.fixture
def planted_package(tmp_path, monkeypatch):
    """A package on sys.path whose every module writes a marker file when imported."""
    name = f"gpc_planted_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "MARKER"
    payload = f"open({str(marker)!r}, 'w').write(__name__)\n"
    (tmp_path / "site" / name / "sub").mkdir(parents=True)
    (tmp_path / "site" / name / "__init__.py").write_text(payload)
    (tmp_path / "site" / name / "sub" / "__init__.py").write_text(payload)
    (tmp_path / "site" / name / "sub" / "mod.py").write_text(payload)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield name, marker, tmp_path / "site" / name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-local")


@pytest.fixture(scope="module")
def runner(local_dir):
    return CliRunner(env={"GRAPHPATCH_CACHE_LOCAL_DIR": str(local_dir)})
