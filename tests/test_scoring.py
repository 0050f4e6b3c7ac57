import pytest
import torch
from torch import nn

import vnm_compile as vnm


def test_criteria_match_their_formulas():
    weight = torch.randn(6, 5)
    norms = torch.rand(5) + 0.1
    magnitude = weight.abs()
    torch.testing.assert_close(vnm.importance(weight, "abs"), magnitude)
    torch.testing.assert_close(vnm.importance(weight, "wanda", norms), magnitude * norms)
    relative = magnitude / magnitude.sum(0) + magnitude / magnitude.sum(1, keepdim=True)
    torch.testing.assert_close(vnm.importance(weight, "ria", norms, a=0.5), relative * norms.sqrt())
    torch.testing.assert_close(vnm.importance(weight, "ria"), relative)
    assert vnm.importance(weight.half(), "abs").dtype == torch.float32


def test_importance_rejects_bad_input():
    with pytest.raises(ValueError, match="criterion"):
        vnm.importance(torch.randn(4, 4), "magnitude")
    with pytest.raises(ValueError, match="act_norm"):
        vnm.importance(torch.randn(4, 4), "wanda")
    with pytest.raises(ValueError, match="act_norm must have shape"):
        vnm.importance(torch.randn(4, 4), "ria", torch.rand(3))


def test_zero_rows_and_columns_score_zero():
    weight = torch.zeros(4, 4)
    weight[0, 0] = 1.0
    scores = vnm.importance(weight, "ria")
    assert torch.isfinite(scores).all() and scores[1:].eq(0).all()


def test_activation_norms_stream_over_batches():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    batches = [torch.randn(4, 8), torch.randn(2, 5, 8)]
    norms = vnm.activation_norms(model, batches)
    inputs = torch.cat([b.reshape(-1, 8) for b in batches])
    torch.testing.assert_close(norms["0"], inputs.norm(dim=0))
    hidden = torch.relu(model[0](inputs))
    torch.testing.assert_close(norms["2"], hidden.norm(dim=0), rtol=1e-5, atol=1e-6)
    assert not model[0]._forward_pre_hooks  # hooks are gone afterwards


def test_activation_norms_accept_kwargs_batches():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 2)

        def forward(self, inputs):
            return self.proj(inputs)

    norms = vnm.activation_norms(Keyword(), [{"inputs": torch.ones(2, 3)}])
    torch.testing.assert_close(norms["proj"], torch.full((3,), 2**0.5))
