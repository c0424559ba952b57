"""The artifact is pure data: JSON round-trips, deterministic, versioned, allowlisted on load."""

import json
import subprocess
import sys

import pytest
import torch

from graphpatch_cache import GraphArtifact, PatchableGraph
from graphpatch_cache.errors import DisallowedTargetError
from graphpatch_cache.extraction import extract


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)

    def forward(self, x):
        return torch.relu(self.norm(self.lin(x))) * 2


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = Small()
    x = torch.randn(2, 4)
    return model, x, extract(model, (x,))


def test_json_round_trip_rebinds_exactly(small):
    model, x, artifact = small
    text = artifact.to_json()
    again = GraphArtifact.from_dict(json.loads(text))
    assert again.to_json() == text
    pg = PatchableGraph.from_artifact(model, again)
    assert torch.equal(pg(x), model(x))
    assert torch.equal(pg(torch.ones(5, 4)), model(torch.ones(5, 4)))


def test_no_executable_content(small):
    _, _, artifact = small
    data = json.loads(artifact.to_json())
    targets = {n["target"] for g in [data["root"]] + data["root"]["children"] for n in g["nodes"]}
    assert "torch.relu" in targets
    assert "torch.nn.functional.linear" in targets or "torch._C._nn.linear" in targets


def test_parameters_bound_by_identity(small):
    model, x, artifact = small
    pg = PatchableGraph.from_artifact(model, artifact)
    bound = dict(pg.named_parameters())
    ours = {id(p) for p in bound.values()}
    assert {id(p) for p in model.parameters()} <= ours
    lin_graph = pg._variants[0].root.lin
    assert lin_graph.weight is model.lin.weight
    assert lin_graph.weight.data_ptr() == model.lin.weight.data_ptr()


def _tamper(artifact: GraphArtifact, target: str) -> str:
    data = json.loads(artifact.to_json())
    for node in data["root"]["nodes"]:
        if node["op"] == "call_function":
            node["target"] = target
            node["args"] = {"t": ["echo pwned > /tmp/graphpatch_pwned"]}
            node["kwargs"] = {"d": []}
            return json.dumps(data)
    raise AssertionError("no call_function node")


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "torch.load", "subprocess.call", "torch.hub.load"])
def test_tampered_target_refused_before_running(small, target, tmp_path):
    model, x, artifact = small
    tampered = GraphArtifact.from_dict(json.loads(_tamper(artifact, target)))
    with pytest.raises(DisallowedTargetError) as info:
        PatchableGraph.from_artifact(model, tampered)
    assert info.value.target == target
    assert info.value.node_path  # names the node
    assert target in str(info.value)


SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from tiny_models import tiny_gpt2, token_inputs
from graphpatch_cache.extraction import extract
model = tiny_gpt2(n_layer=2)
sys.stdout.write(extract(model, (), token_inputs()).to_json())
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_processes_produce_identical_artifacts(tmp_path):
    import os

    tests = os.path.join(os.path.dirname(os.path.dirname(__file__)), "helpers")  # tiny_models
    outs = [
        subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests)], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert outs[0] == outs[1]
    assert json.loads(outs[0])["schema_version"] == 1
