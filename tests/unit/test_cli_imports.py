"""The command line answers --help, ls, rm, gc, info, usage errors and a misspelt MODEL (also in diff) without
importing torch or transformers (they cost seconds; `scripts/bench_cli.py` times the commands).

Oracle: the interpreter's own import log (``python -X importtime``) of a fresh process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess

HEAVY = ("torch", "transformers")


def _run(args, tmp_path, code):
    env = {**os.environ, "GRAPHPATCH_CACHE_DIR": str(tmp_path / "root"),
           "GRAPHPATCH_CACHE_LOCAL_DIR": str(tmp_path / "local"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "graphpatch_cache", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, (args, proc.stdout, proc.stderr[-2000:])
    imported = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", proc.stderr, flags=re.M))
    assert "graphpatch_cache.cli.main" in imported  # the log is read right
    return proc, {m for m in imported if m.split(".")[0] in HEAVY}


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["ls"], 0),
    (["ls", "--json"], 0),
    (["gc", "--older-than", "30d"], 0),
    (["gc", "--older-than", "30"], 2),  # a usage error
    (["rm", "abc123"], 1),
    (["info", "--json"], 0),
    (["lss"], 2),
    (["build", "tiny-lama"], 1),  # a misspelt preset
    (["show", "nosuch/model"], 1),  # neither a key nor a model in the local Hugging Face cache
    (["diff", "nosuch/model", "tiny-gpt2"], 1),  # diff imports torch only once both sides are found
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_quick_commands_do_not_import_torch_or_transformers(args, code, tmp_path):
    proc, heavy = _run(args, tmp_path, code)
    assert heavy == set(), f"{' '.join(args)} imported {sorted(heavy)[:5]}"
    if args == ["build", "tiny-lama"]:
        assert "did you mean tiny-llama" in proc.stderr
    if args == ["info", "--json"]:
        # the versions it reports without importing them are the ones a key uses
        from graphpatch_cache.cache import environment_fingerprint

        assert json.loads(proc.stdout)["environment"] == environment_fingerprint()
