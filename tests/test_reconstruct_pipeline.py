"""method="sparsegpt" in the eager `sparsify` and the "vnm" backend: permute first, then reconstruct."""

import pytest
import torch
from conftest import tiny_config
from torch import nn

import vnm_compile as vnm
from vnm_compile.reconstruct import reconstruct

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _gpt2():
    torch.manual_seed(0)
    config = tiny_config("gpt2")
    return transformers.GPT2LMHeadModel(config).eval()


def _batches(count: int = 3):
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128, (2, 17), generator=generator), "use_cache": False}
            for _ in range(count)]


def test_sparsify_reconstructs_each_layer_in_its_permuted_order():
    model, batches = _gpt2(), _batches()
    calibration = vnm.calibrate(model, batches, hessians=True)
    config = vnm.VNMConfig(v=16, m=8, method="sparsegpt", permute=True, min_features=48, verify=True)
    vnm.sparsify(model, batches[0], config, calibration=calibration)
    report = vnm.reports()[-1]
    assert report.sparse_layers and any(layer.input_perm is not None for layer in report.sparse_layers)
    for layer in report.sparse_layers:
        weight = model.get_submodule(layer.name).weight.detach()
        weight = weight.t() if layer.transposed else weight
        hessian = calibration.layers[layer.name].hessian
        rows = layer.output_perm if layer.output_perm is not None else torch.arange(weight.shape[0])
        columns = layer.input_perm if layer.input_perm is not None else torch.arange(weight.shape[1])
        expected, mask = reconstruct(weight[rows][:, columns], hessian[columns][:, columns], 16, 8)
        assert torch.equal(layer.weight.mask(), mask), layer.name
        torch.testing.assert_close(layer.weight.to_dense(), expected, rtol=1e-5, atol=1e-6)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_backend_reconstructs_from_the_example_inputs():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = _MLP(), torch.randn(96, 64)
    options = {"v": 16, "m": 6, "method": "sparsegpt", "permute": False, "inductor": False}
    with torch.no_grad():
        out = torch.compile(model, backend="vnm", options=options)(x)
    layers = {layer.name: layer for layer in vnm.reports()[-1].sparse_layers}
    assert set(layers) == {"up", "down"}
    # The kept weights moved: this is reconstruction, not masking.
    assert not torch.equal(layers["up"].masked_weight(), model.up.weight.detach() * layers["up"].weight.mask())
    with torch.no_grad():
        hidden = torch.relu(nn.functional.linear(x, layers["up"].masked_weight(), model.up.bias))
        reference = nn.functional.linear(hidden, layers["down"].masked_weight(), model.down.bias)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    hessian = x.T @ x
    expected, _ = reconstruct(model.up.weight.detach(), hessian, 16, 6)
    torch.testing.assert_close(layers["up"].masked_weight(), expected, rtol=1e-5, atol=1e-6)


def test_sparsegpt_without_hessians_is_a_clear_error():
    model, batches = _gpt2(), _batches(1)
    calibration = vnm.calibrate(model, batches)
    with pytest.raises(ValueError, match="hessians=True"):
        vnm.sparsify(model, batches[0], vnm.VNMConfig(v=16, m=8, method="sparsegpt", min_features=48),
                     calibration=calibration)


def test_hessians_follow_the_input_permutation():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(20, 6, generator=generator)
    stats = vnm.LayerStats(x.norm(dim=0), x.T @ x)
    perm = torch.randperm(6, generator=generator)
    permuted = stats.permuted(perm)
    torch.testing.assert_close(permuted.hessian, x[:, perm].T @ x[:, perm])
    torch.testing.assert_close(permuted.act_norm, x[:, perm].norm(dim=0))
