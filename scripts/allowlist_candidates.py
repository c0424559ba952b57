"""Regenerate a candidate allowlist from the graphs our test models produce.

Runs the model-building tests in a subprocess with ``scripts/record_targets_plugin.py``,
which records every call target, Tensor method and ``getattr`` attribute that extraction
asked to store (accepting them all, so nothing is hidden behind an opaque fallback), then
compares with the shipped list ``cache_schema/allowlist-v1.json``. Prints one JSON object:
``observed`` (names seen, by kind), ``new`` (seen but not on the list: review each, then add
it), ``unseen`` (on the list, never seen by these tests). ``--write`` adds the new names to
the list file (sorted, one per line) for review in ``git diff``; nothing is ever added
without that review. The recorded test run is expected to report failures: with every name
accepted, the tests that check refusals fail; ``run`` shows its summary for information.

Run: python scripts/allowlist_candidates.py [--tests tests/integration/test_hf_models.py ...] [--from RECORD.jsonl] [--write]
(not collected by pytest)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "cache_schema" / "allowlist-v1.json"
DEFAULT_TESTS = ["tests/integration/test_hf_models.py", "tests/integration/test_structures.py",
                 "tests/integration/test_kv_cache.py", "tests/integration/test_big_models.py",
                 "tests/integration/test_patchable_graph.py", "tests/integration/test_extraction.py",
                 "tests/integration/test_readme.py", "tests/unit/test_patches.py", "tests/test_model_zoo.py"]
KINDS = {"functions": "call_function", "methods": "call_method"}


def record(tests: list, out: Path) -> dict:
    env = dict(os.environ, GRAPHPATCH_RECORD_TARGETS=str(out),
               PYTHONPATH=os.pathsep.join([str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "record_targets_plugin", "-p", "no:cacheprovider",
                           *[t for t in tests if (ROOT / t).exists()]], cwd=ROOT, env=env, capture_output=True, text=True)
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "summary": (proc.stdout.strip().splitlines() or [""])[-1]}


def observed(path: Path) -> dict:
    seen = {"functions": set(), "methods": set(), "attributes": set()}
    artifacts = 0
    for line in path.read_text().splitlines():
        artifacts += 1
        for row in json.loads(line)["rows"]:
            if row["op"] == "call_function":
                seen["functions"].add(row["target"])
            elif row["op"] == "call_method":
                seen["methods"].add(row["target"])
            if row.get("attr") is not None:
                seen["attributes"].add(row["attr"] if isinstance(row["attr"], str) else json.dumps(row["attr"]))
    return {"artifacts": artifacts, **{k: sorted(v) for k, v in seen.items()}}


def write_list(data: dict) -> None:
    """One name per line, sorted: an addition is a one-line diff."""
    lines = ["{", f'  "format": {json.dumps(data["format"])},', f'  "version": {data["version"]},']
    for i, kind in enumerate(("functions", "methods", "attributes")):
        names = sorted(set(data[kind]))
        lines.append(f'  "{kind}": [')
        lines += [f"    {json.dumps(n)}{',' if j < len(names) - 1 else ''}" for j, n in enumerate(names)]
        lines.append("  ]" + ("," if i < 2 else ""))
    lines.append("}")
    LIST.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", nargs="*", default=DEFAULT_TESTS)
    parser.add_argument("--from", dest="source", type=Path, default=None, help="a record written earlier")
    parser.add_argument("--write", action="store_true", help="add the new names to the list file")
    args = parser.parse_args()
    report: dict = {}
    if args.source is None:
        source = Path(tempfile.mkdtemp()) / "targets.jsonl"
        report["run"] = record(args.tests, source)
    else:
        source = args.source
    seen = observed(source)
    shipped = json.loads(LIST.read_text())
    report["observed"] = seen
    report["new"] = {k: sorted(set(seen[k]) - set(shipped[k])) for k in ("functions", "methods", "attributes")}
    report["unseen"] = {k: sorted(set(shipped[k]) - set(seen[k])) for k in ("functions", "methods", "attributes")}
    if args.write and any(report["new"].values()):
        for k, names in report["new"].items():
            shipped[k] = sorted(set(shipped[k]) | set(names))
        write_list(shipped)
        report["written"] = str(LIST)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
