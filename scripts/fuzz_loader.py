"""Fuzz the artifact loader (issue 9) and print the counts by outcome as one JSON object.

    python scripts/fuzz_loader.py                 # 10,000 cases, seed 0
    python scripts/fuzz_loader.py --cases 500 --seed 7

Each case is a seeded mutation of the real artifact of tests/helpers/hostile.py's tiny model,
loaded through the cache door (read_artifact + bind) and, if it loads, called on the example
inputs. Outcomes: refused_typed, untyped_at_load (a bug), loaded_equal, loaded_different,
call_error_typed, call_error_untyped; flags that must stay 0: payload_marker, weights_changed,
global_state_changed. The output holds the first few examples of every outcome but
refused_typed (with the seed that rebuilds each: Mutator(artifact).mutate(seed)) and timing.
Exit status 1 when a guarantee broke (untyped_at_load or any flag), else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "helpers"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", type=int, default=5, help="examples kept per outcome")
    parser.add_argument("--time-limit", type=float, default=20.0, help="seconds per case before it counts as hung")
    parser.add_argument("--progress", action="store_true", help="print counts to stderr every 500 cases")
    args = parser.parse_args(argv)

    import hostile  # tests/helpers/hostile.py: the tiny model, the mutator, the classification

    with tempfile.TemporaryDirectory(prefix="gpc-fuzz-") as tmp:
        os.environ.setdefault("GRAPHPATCH_CACHE_DIR", str(Path(tmp) / "default-root"))
        os.environ.setdefault("GRAPHPATCH_CACHE_LOCAL_DIR", str(Path(tmp) / "default-local"))
        t0 = time.perf_counter()
        legit = hostile.legit_setup(Path(tmp))
        setup = time.perf_counter() - t0

        def progress(done, counts):
            if args.progress and done % 500 == 0:
                print(f"{done}/{args.cases} {json.dumps(counts)}", file=sys.stderr, flush=True)

        report = hostile.fuzz(legit, Path(tmp), args.cases, seed=args.seed, examples_per_outcome=args.examples,
                              time_limit=args.time_limit, progress=progress)
    out = report.as_json()
    out["setup_seconds"] = round(setup, 2)
    broken = {k: out["counts"][k] for k in ("untyped_at_load",) + hostile.FLAGS if out["counts"][k]}
    out["guarantees_hold"] = not broken
    print(json.dumps(out, indent=1))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
