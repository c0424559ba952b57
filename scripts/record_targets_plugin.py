"""pytest plugin (used by scripts/allowlist_candidates.py): record what every extracted graph names.

Loaded with ``-p record_targets_plugin`` (scripts/ on ``PYTHONPATH``); writes one JSON line per
extracted artifact to ``$GRAPHPATCH_RECORD_TARGETS``. Never collected by pytest itself.
"""

from __future__ import annotations

import json
import os

import pytest


def _walk_values(value, found):
    if isinstance(value, dict):
        if len(value) == 1:
            (tag, x), = value.items()
            if tag == "fn":
                found.add(x)
                return
        for v in value.values():
            _walk_values(v, found)
    elif isinstance(value, list):
        for v in value:
            _walk_values(v, found)


def _record(artifact, out) -> None:
    rows = []
    for graph in artifact.root.walk():
        for nd in graph.nodes:
            if nd.op not in ("call_function", "call_method"):
                continue
            fns: set = set()
            _walk_values(nd.args, fns)
            _walk_values(nd.kwargs, fns)
            attr = None
            if nd.target in ("builtins.getattr",):
                args = nd.args.get("t", []) if isinstance(nd.args, dict) else []
                attr = args[1] if len(args) > 1 else None
            kwargs = [k[0] for k in nd.kwargs.get("d", [])] if isinstance(nd.kwargs, dict) else []
            rows.append({"op": nd.op, "target": nd.target, "fns": sorted(fns), "attr": attr, "kwargs": kwargs})
        for local, qualified in graph.attributes.items():
            rows.append({"op": "attribute", "kind": graph.kind, "module_path": graph.module_path,
                         "local": local, "binds": qualified})
    with open(out, "a") as f:
        f.write(json.dumps({"model": artifact.model_class, "rows": rows}) + "\n")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    out = os.environ.get("GRAPHPATCH_RECORD_TARGETS")
    if not out:
        return
    import graphpatch_cache.extraction as extraction

    original = extraction.extract
    import graphpatch_cache.trust.validate as validate

    validate.check_artifact = lambda artifact, path="": None  # record, never refuse

    def recording_extract(*args, **kwargs):
        artifact = original(*args, **kwargs)
        _record(artifact, out)
        return artifact

    extraction.extract = recording_extract

    # accept (and so record) every name extraction asks for: a refused name would otherwise
    # hide behind an opaque fallback and never reach the candidate list
    import graphpatch_cache.trust.allowlist as allowlist

    allowlist.function_allowed = lambda name: True
    allowlist.method_allowed = lambda name: True
    allowlist.attribute_allowed = lambda name: True
