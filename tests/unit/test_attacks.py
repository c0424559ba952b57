"""The loader is a trust boundary (issue 9): an attack corpus delivered through every door.

Each case takes the real artifact of :class:`hostile.Tiny` (extracted once per session) and
inserts or replaces nodes in its JSON form. The result is well-formed (it matches the JSON
Schema, and every door gets correct sha256 digests) unless the case says otherwise. If its
payload ran, it would create ``MARKER`` in the case's directory (or delete ``victim/``), change
the model's parameters, or leave the process's torch state changed. Every case goes through
all three doors: a planted cache blob + ref (``test_cache_door``), a portable file given to
``PatchableGraph.load`` (``test_portable_door``), and ``graphpatch-cache import``
(``test_cli_import_door``).

What each case expects (``expect``):

* ``refuse``: a :class:`~graphpatch_cache.errors.GraphPatchCacheError` at load, before any
  graph runs. (``import`` exits non-zero with a library error and stores nothing.)
* ``contain``: global-state and source-lookup cases, where the loader MAY accept the graph:
  then loading and calling it must leave the model, the process's torch state and the disk as
  they were (a typed error at load or call is fine too; an untyped one is not).
* ``inert``: must load and compute exactly the model's output (a ``code`` field full of
  Python is never executed).

Independent oracles: the marker file on disk, a clone of every parameter (values, shapes,
``requires_grad``, ``.grad``, hooks) taken before, the torch global state taken before, and
the model's own output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List



from hostile import (Ctx)


@dataclass(frozen=True)
class Attack:
    name: str  # "<family>-<case>": the test id
    expect: str  # "refuse" | "contain" | "inert"
    build: Callable[[Dict[str, Any], Ctx], None]  # mutates a fresh copy of the legit artifact
    live: str  # what the payload does if it runs ("" for a probe whose danger is the name alone)
    max_load_seconds: float = 30.0


ATTACKS: List[Attack] = []


def test_corpus_size_and_families() -> None:
    """The issue asks for at least 40 hand-written hostile artifacts, named by family."""
    refused = [a for a in ATTACKS if a.expect == "refuse"]
    assert len(refused) >= 40, len(refused)
    families = {a.name.split("-")[0] for a in ATTACKS}
    for family in ("operator", "getattr", "aten", "storage", "builtins", "importlib", "os", "subprocess", "sys",
                   "shutil", "pickle", "marshal", "ctypes", "torch", "higher_order", "profiler", "method", "attr",
                   "get_attr", "module_path", "inplace", "state", "name", "code", "bounds", "odd", "pytree"):
        assert family in families, family
