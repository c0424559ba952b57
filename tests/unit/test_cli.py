"""The graphpatch-cache CLI without a build: argument errors, device-map checks, presets, help
and version, through click's CliRunner (commands on a built cache:
tests/integration/test_cli.py). Oracles are exit statuses, messages and the files on disk."""

from __future__ import annotations

import json

import pytest

from cli_run import invoke
from graphpatch_cache.cli.presets import PRESETS, preset_config

COMMANDS = ["build", "ls", "show", "verify", "gc", "rm", "export", "import", "info"]




def test_build_checks_the_device_map(runner, tmp_path):
    result = invoke(runner, "build", "tiny-llama", "--device-map", '{"model.layer.0": 0, "lm_head": "cpu"}',
                    "--cache-dir", tmp_path, code=1)
    assert "model.layer.0" in result.stderr and "model.layers.0" in result.stderr  # a close match
    invoke(runner, "build", "tiny-llama", "--device-map", "{not json", "--cache-dir", tmp_path, code=2)
    invoke(runner, "build", "tiny-llama", "--device-map", tmp_path / "missing.json", "--cache-dir", tmp_path, code=2)
    assert not (tmp_path / "refs").exists()


def test_build_errors(runner, tmp_path):
    result = invoke(runner, "build", "tiny-gtp2", "--cache-dir", tmp_path, code=1)
    assert "Error:" in result.stderr and "did you mean tiny-gpt2" in result.stderr
    assert "Traceback" not in result.stderr
    result = invoke(runner, "build", "nobody/no-such-model", "--cache-dir", tmp_path, code=1)
    assert "local Hugging Face cache" in result.stderr and "hf download nobody/no-such-model" in result.stderr
    (tmp_path / "empty").mkdir()
    assert "no config.json" in invoke(runner, "build", tmp_path / "empty", code=1).stderr
    invoke(runner, "build", code=2)  # missing MODEL
    invoke(runner, "build", "tiny-gpt2", "--dtype", "float8", code=2)
    invoke(runner, "build", "tiny-gpt2", "--seq-len", "0", code=2)
    assert not (tmp_path / "refs").exists()


def test_verbose_shows_the_traceback(runner, tmp_path):
    result = invoke(runner, "build", "nosuch-model", "--cache-dir", tmp_path, "-v", code=1)
    assert "Traceback" in result.stderr and "BuildError" in result.stderr and "Error:" in result.stderr
    assert "Traceback" in invoke(runner, "-v", "rm", "0000", "--cache-dir", tmp_path, code=1).stderr


def test_presets_are_the_hub_configs_as_from_pretrained_reads_them(tmp_path):
    from transformers import AutoConfig

    assert {"tiny-gpt2", "tiny-llama", "gpt2", "gpt2-xl", "llama-7b", "llama-2-7b", "mistral-7b"} <= set(PRESETS)
    for name, preset in PRESETS.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(preset.config))
        want = AutoConfig.from_pretrained(folder).to_dict()
        have = preset_config(preset).to_dict()
        want.pop("_name_or_path"), have.pop("_name_or_path")
        assert have == want, name
    assert preset_config(PRESETS["llama-7b"]).hidden_size == 4096
    assert preset_config(PRESETS["mistral-7b"]).num_key_value_heads == 8


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(runner, command):
    text = invoke(runner, command, "--help").stdout
    assert "Examples:" in text and "graphpatch-cache " + command in text
    assert "--json prints:" in text


def test_top_level_help_and_version(runner):
    text = invoke(runner, "--help").stdout
    assert all(c in text for c in COMMANDS)
    import graphpatch_cache

    assert graphpatch_cache.__version__ in invoke(runner, "--version").stdout
    invoke(runner, "no-such-command", code=2)
