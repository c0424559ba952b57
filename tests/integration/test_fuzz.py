"""Bounded fuzzing of the loader (issue 9): seeded mutations of a real artifact.

Every mutant (see :class:`hostile.Mutator`: nodes changed, deleted, duplicated or reordered,
targets swapped among real, allowlist-ish and hostile names, op kinds changed, references
broken, tags changed, values replaced by random JSON, fields dropped or added, bytes
truncated or flipped) goes in by the cache door (``read_artifact`` + bind, what a hit does)
and, if it loads, is called on the example inputs. Each case is classified: ``refused_typed``
(a GraphPatchCacheError at load), ``untyped_at_load`` (any other exception at load: a bug),
``loaded_equal``, ``loaded_different`` (allowed: a well-formed artifact can compute something
else), ``call_error_typed``, ``call_error_untyped``; plus the flags ``payload_marker``,
``weights_changed`` and ``global_state_changed``, which must never be raised.

GRAPHPATCH_FUZZ_CASES (default 300) and GRAPHPATCH_FUZZ_SEED (default 0) size the run;
``scripts/fuzz_loader.py`` runs 10,000 and prints the counts as JSON. A failure prints the
first failing mutations; ``Mutator(artifact).mutate(seed)`` rebuilds any of them.
"""

from __future__ import annotations

import json
import os

import pytest

from hostile import FLAGS, OUTCOMES, Legit, Mutator, fuzz, legit_setup

pytestmark = pytest.mark.slow  # legit_setup extracts; hundreds of fuzzed loads

CASES = int(os.environ.get("GRAPHPATCH_FUZZ_CASES", "300"))
SEED = int(os.environ.get("GRAPHPATCH_FUZZ_SEED", "0"))


@pytest.fixture(scope="session")
def legit(tmp_path_factory) -> Legit:
    return legit_setup(tmp_path_factory.mktemp("legit"))


def test_mutator_is_deterministic_and_varied(legit: Legit) -> None:
    mutator = Mutator(legit.artifact)
    assert mutator.mutate(12345) == mutator.mutate(12345)
    blobs = {mutator.mutate(seed)[0] for seed in range(50)}
    assert len(blobs) > 40  # nearly every seed gives a different mutant


def test_fuzz_loader(legit: Legit, tmp_path) -> None:
    report = fuzz(legit, tmp_path, CASES, seed=SEED)
    counts = report.counts
    assert sum(counts[o] for o in OUTCOMES) == CASES
    # the fuzzer reaches past the parser: some mutants load, some are refused
    assert counts["refused_typed"] > 0 and counts["loaded_equal"] + counts["loaded_different"] > 0, counts
    bad = {key: counts[key] for key in ("untyped_at_load",) + FLAGS if counts[key]}
    assert not bad, (f"fuzz (seed {SEED}, {CASES} cases) broke the loader's guarantees: {bad}\n"
                     f"counts: {json.dumps(counts)}\nfirst failing mutations (reproduce with "
                     f"Mutator(artifact).mutate(seed)):\n" + json.dumps(report.failures()[:10], indent=1))
