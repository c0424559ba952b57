"""The closed allowlist at extraction: a module calling an op outside the list stays opaque
(the list itself: tests/unit/test_allowlist.py)."""


import pytest
import torch

from graphpatch_cache import register_target


class _UsesUnlistedOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.fmax(self.inner(x), x)  # torch.fmax is not on the list


@pytest.mark.slow
@pytest.mark.allowlist_refusal
def test_an_unlisted_op_keeps_its_module_opaque():
    """An op outside the list is never stored: extraction keeps the module that calls it opaque
    (exact outputs, the reason recorded), and registering the function lets it compile."""
    from graphpatch_cache import ExtractionOptions, PatchableGraph

    torch.manual_seed(0)
    model = _UsesUnlistedOp().eval()
    x = torch.randn(2, 4)
    pg = PatchableGraph(model, x)
    assert torch.equal(pg(x), model(x))
    reasons = pg.artifact.extraction["opaque"]
    assert any("torch.fmax" in why and "not on the allowlist" in why for why in reasons.values()), reasons
    assert pg.artifact.root.kind == "opaque"
    register_target(torch.fmax, name="torch.fmax")
    try:
        pg = PatchableGraph(model, ExtractionOptions(), x)
        assert pg.artifact.root.kind == "compiled" and not pg.artifact.extraction["opaque"]
        assert torch.equal(pg(x), model(x))
    finally:
        from graphpatch_cache.trust import allowlist

        allowlist._REGISTERED.pop("torch.fmax", None)
