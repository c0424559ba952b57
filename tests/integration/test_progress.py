"""What an extraction prints while it runs (graphpatch_cache.progress), as a user sees it.

In-process tests read stderr through capsys (no terminal: one line per phase). Subprocess
tests run this checkout's library with stderr on a pipe (lines, a cache hit silent) and on a
pseudo-terminal (a tqdm bar). The module-call counts are checked against an independent
count: forward pre-hooks on every module during a plain eager call.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cli_run import invoke
from graphpatch_cache import ExtractionOptions, PatchableGraph, load_cached, show_progress
from graphpatch_cache import progress

pytestmark = pytest.mark.slow  # every test extracts a (tiny) graph

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^graphpatch_cache: (extracting [^:]+): (.*)$")

MODEL_SOURCE = textwrap.dedent("""
    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.act = torch.nn.ReLU()

        def forward(self, x):
            return self.act(self.lin(x)) + x

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(x)
""")
_namespace: dict = {}
exec(compile(MODEL_SOURCE, "<progress test model>", "exec"), _namespace)
Net = _namespace["Net"]


@pytest.fixture(autouse=True)
def _no_setting(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)


def _module_calls(model: torch.nn.Module, x: torch.Tensor) -> int:
    """The oracle: module calls of one eager call, counted by hooks."""
    calls = []
    handles = [m.register_forward_pre_hook(lambda mod, args: calls.append(mod)) for m in model.modules()]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return len(calls)


def _events(err: str):
    """[(title, text)] of the progress lines in ``err``; any other line is left out."""
    return [m.groups() for m in map(LINE.match, err.splitlines()) if m]


def _phases(events):
    return [text.split(" done (")[0] for _, text in events if " done (" in text]


def test_phases_in_order_with_module_calls_counted(capsys):
    model, x = Net(), torch.randn(3, 4)
    n = _module_calls(model, x)
    assert n == 8
    pg = PatchableGraph(model, ExtractionOptions(progress=True), x)
    err = capsys.readouterr().err
    assert "\r" not in err
    events = _events(err)
    assert {t for t, _ in events} == {"extracting Net"}
    assert events[0][1] == "started" and events[-1][1].startswith("finished in ")
    assert _phases(events) == ["canonical inputs", "eager recording", "dynamo trace", "splitting", "serialization",
                               "sources and validation"]
    done = dict((text.split(" done (")[0], text) for _, text in events if " done (" in text)
    assert done["dynamo trace"].endswith(f", {n}/{n} module calls)")
    assert done["splitting"].endswith(f", {n}/{n} module calls)")
    assert torch.equal(pg(x), model(x))  # (the graph the progress was about)


def test_quiet_settings_print_nothing(capsys, monkeypatch):
    model, x = Net(), torch.randn(3, 4)
    monkeypatch.setenv(progress.ENV, "1")
    PatchableGraph(model, ExtractionOptions(progress=False), x)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(progress.ENV, "0")
    with show_progress():
        PatchableGraph(model, x)
    assert capsys.readouterr().err == ""


def test_it_appears_after_the_delay_only(capsys):
    model, x = Net(), torch.randn(3, 4)
    with show_progress(delay=600):  # longer than any extraction of this model
        PatchableGraph(model, x)
    assert capsys.readouterr().err == ""
    with show_progress(delay=0.01):  # shown by the drawing thread, from the phase then running
        PatchableGraph(model, x)
    events = _events(capsys.readouterr().err)
    assert events and "so far)" in events[0][1] and events[-1][1].startswith("finished in ")


def test_a_miss_stores_and_a_hit_prints_nothing(capsys, tmp_path):
    model, x = Net(), torch.randn(3, 4)
    pg = load_cached(model, x, options=ExtractionOptions(progress=True), store=tmp_path)
    assert pg.cache_stats.misses == 1
    phases = _phases(_events(capsys.readouterr().err))
    assert phases[-1] == "storing in the cache" and phases.index("dynamo trace") < phases.index("storing in the cache")
    assert "waiting for the cache lock" not in phases  # an uncontended lock is no news
    # a hit extracts nothing: silent even when asked to show progress, and the option is no
    # part of the key (progress=False finds the entry that progress=True stored)
    hit = load_cached(model, x, options=ExtractionOptions(progress=False), store=tmp_path)
    with show_progress():
        hit = load_cached(model, x, options=ExtractionOptions(progress=True), store=tmp_path)
    assert hit.cache_stats.hits == 1 and hit.cache_stats.misses == 0
    assert capsys.readouterr().err == ""


def test_an_on_demand_variant_says_so(capsys):
    model = Net()
    pg = PatchableGraph(model, ExtractionOptions(progress=True, on_new_variant="extract"), torch.randn(3, 4))
    capsys.readouterr()
    pg(torch.randn(2, 3, 4))  # another rank: a new variant
    assert len(pg.variants) == 2
    events = _events(capsys.readouterr().err)
    assert events and {t for t, _ in events} == {"extracting a new graph variant of Net"}
    assert "dynamo trace" in _phases(events)


def test_a_retried_trace_says_why_instead_of_starting_over(capsys):
    """sdpa given a symbolic ``is_causal`` (a length traced at 1, size-obliviously) fails the
    first trace; the retry keeps the example's 1s fixed and its lines say so."""
    import torch.nn.functional as F

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            q = self.lin(x)
            return F.scaled_dot_product_attention(q, q, q, is_causal=q.shape[-2] > 1)

    model, x = Attn(), torch.randn(2, 1, 4)
    pg = PatchableGraph(model, ExtractionOptions(progress=True), x)
    assert _phases(_events(capsys.readouterr().err)) == [
        "canonical inputs", "eager recording", "dynamo trace", "eager recording (again: sizes of 1 kept fixed)",
        "dynamo trace (again: sizes of 1 kept fixed)", "splitting", "serialization", "sources and validation"]
    assert torch.equal(pg(x), model(x))


def test_opaque_children_are_counted_in_their_parent(capsys):
    model, x = Net(), torch.randn(3, 4)
    block_cls = type(model.blocks[0])
    PatchableGraph(model, ExtractionOptions(progress=True, classes_to_skip_compiling=(block_cls,)), x)
    events = _events(capsys.readouterr().err)
    assert {t for t, _ in events} == {"extracting Net"}  # the children's extractions report nothing of their own
    assert _phases(events).count("dynamo trace") == 1
    opaque = [text for _, text in events if text.startswith("opaque children done")]
    assert len(opaque) == 1 and opaque[0].endswith(", 4/4 module calls)")  # lin and act of each block
    # the parent's trace went through Net, two opaque blocks and head
    assert [text for _, text in events if text.startswith("dynamo trace done")][0].endswith(", 4/4 module calls)")


# -- subprocesses ----------------------------------------------------------------------------------
SCRIPT = MODEL_SOURCE + textwrap.dedent("""
    import sys
    from graphpatch_cache import ExtractionOptions, load_cached

    store = sys.argv[1]
    x = torch.randn(3, 4)

    def mark(text):
        print(f"--{text}--", file=sys.stderr, flush=True)

    mark("miss")
    load_cached(Net(), x, store=store)
    mark("hit")
    load_cached(Net(), x, store=store)
    mark("quiet miss")
    load_cached(Net(), x, store=store + "-other", options=ExtractionOptions(progress=False))
    mark("end")
""")


def _env(tmp_path: Path, setting: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRAPHPATCH_CACHE_LOCAL_DIR=str(tmp_path / "local"))
    env[progress.ENV] = setting
    return env


@pytest.mark.subprocess
def test_a_piped_stderr_gets_one_line_per_phase_and_a_hit_none(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "store")], capture_output=True, text=True,
                          env=_env(tmp_path, "1"), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "\r" not in err
    miss, rest = err.split("--miss--\n")[1].split("--hit--\n")
    hit, rest = rest.split("--quiet miss--\n")
    quiet = rest.split("--end--")[0]
    events = _events(miss)
    assert _phases(events) == ["eager recording", "dynamo trace", "splitting", "serialization",
                               "sources and validation", "storing in the cache"]
    assert [text for _, text in events if text.startswith("dynamo trace done")][0].endswith(", 8/8 module calls)")
    assert events[-1][1].startswith("finished in ")
    assert _events(hit) == [] and _events(quiet) == []


def _on_a_terminal(code: str, env: dict, cwd: Path) -> str:
    """Run ``code`` with stderr on a new pseudo-terminal; what the terminal received."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    received = b""
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child has closed the terminal
                break
            if not chunk:
                break
            received += chunk
    finally:
        os.close(master)
        proc.wait(timeout=60)
    assert proc.returncode == 0, received.decode(errors="replace")[-3000:]
    return received.decode(errors="replace")


@pytest.mark.subprocess
def test_a_terminal_gets_a_tqdm_bar(tmp_path):
    code = MODEL_SOURCE + "\nfrom graphpatch_cache import PatchableGraph\nPatchableGraph(Net(), torch.randn(3, 4))\n"
    out = _on_a_terminal(code, _env(tmp_path, "1"), tmp_path)
    frames = out.split("\r")
    bars = [f for f in frames if f.startswith("graphpatch_cache: extracting Net:") and "%|" in f]
    assert len(bars) >= 3, out  # redrawn in place, no line per phase
    assert "dynamo trace" in out and "100%|" in bars[-1] and "done" in bars[-1]
    assert " done (" not in out  # not the plain lines of a log


# -- the command line ------------------------------------------------------------------------------
def test_cli_build_prints_phases_on_stderr_only(runner, tmp_path):
    root = tmp_path / "root"
    one = ["--batch-size", "2", "--no-use-cache"]  # one call (the default build makes several)
    as_json = invoke(runner, "build", "tiny-gpt2", *one, "--cache-dir", root, "--json")
    assert json.loads(as_json.stdout)["cached"] is False and _events(as_json.stderr) == []
    result = invoke(runner, "build", "tiny-gpt2", *one, "--cache-dir", root, "--force")
    events = _events(result.stderr)
    assert {t for t, _ in events} == {"extracting GPT2LMHeadModel"} and events[0][1] == "started"
    assert "dynamo trace" in _phases(events) and events[-1][1].startswith("finished in ")
    assert "graphpatch_cache:" not in result.stdout and "built tiny-gpt2" in result.stdout
    hit = invoke(runner, "build", "tiny-gpt2", *one, "--cache-dir", root)
    assert "already cached" in hit.stdout and _events(hit.stderr) == []


@pytest.mark.subprocess
def test_a_jupyter_kernel_gets_a_bar(tmp_path):
    """A real IPython kernel (where ipykernel and jupyter_client are installed; this suite's
    environment has neither, so it runs where a developer installs them): the bar reaches
    the cell's output as a widget (ipywidgets installed) or as a text bar redrawn in place,
    never as the plain lines of a log."""
    ipykernel = pytest.importorskip("ipykernel")
    jupyter_client = pytest.importorskip("jupyter_client")
    env = _env(tmp_path, "1")
    # the kernel imports this checkout, and ipykernel (ipywidgets) from where this process does
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(Path(ipykernel.__file__).resolve().parents[1])]
                                        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    manager = jupyter_client.KernelManager(kernel_name="python3")
    manager.start_kernel(env=env, cwd=str(tmp_path))
    client = manager.client()
    try:
        client.start_channels()
        client.wait_for_ready(timeout=120)
        code = MODEL_SOURCE + "\nfrom graphpatch_cache import PatchableGraph\nPatchableGraph(Net(), torch.randn(3, 4))\n"
        msg_id = client.execute(code)
        stderr, displayed, error = "", [], None
        while True:
            msg = client.get_iopub_msg(timeout=300)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stderr":
                stderr += content["text"]
            elif kind == "display_data":
                displayed.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                error = "\n".join(content["traceback"])
            elif kind == "status" and content["execution_state"] == "idle":
                break
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    assert error is None, error
    assert " done (" not in stderr, stderr  # not the lines of a log
    if importlib.util.find_spec("ipywidgets") is None:
        bars = [f for f in stderr.split("\r") if f.startswith("graphpatch_cache: extracting Net:") and "%|" in f]
        assert bars and "100%|" in bars[-1] and "done" in bars[-1], stderr
    else:  # a widget, shown once, then updated through its comm
        assert any(text.startswith("graphpatch_cache: extracting Net:") for text in displayed), displayed
