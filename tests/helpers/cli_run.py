"""Running the click app in-process, as the CLI tests do."""

from __future__ import annotations

from graphpatch_cache.cli.main import cli

__all__ = ["invoke"]


def invoke(runner, *args, code=0):
    result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result
