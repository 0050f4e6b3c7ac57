import pytest
import torch
from torch import nn

import vnm_compile as vnm
from vnm_compile.reconstruct import HessianAccumulator, reconstruct

# (rows, cols, v, m): every pattern of the benchmarks, with shapes that V or M do not divide.
CASES = [(128, 96, 64, 4), (100, 70, 64, 5), (72, 90, 16, 6), (50, 131, 16, 8), (33, 37, 16, 5)]


def correlated_inputs(tokens: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    mixing = torch.eye(cols) + 2 * torch.randn(cols, cols, generator=generator) / cols**0.5
    scales = torch.rand(cols, generator=generator) * 3 + 0.1
    return (torch.randn(tokens, cols, generator=generator) @ mixing) * scales


@pytest.mark.parametrize("rows, cols, v, m", CASES)
def test_reconstruction_beats_masking(rows, cols, v, m):
    generator = torch.Generator().manual_seed(rows * cols + m)
    weight = torch.randn(rows, cols, generator=generator)
    x = correlated_inputs(4 * cols, cols, generator)
    updated, mask = reconstruct(weight, x.T @ x, v, m)

    assert mask.shape == weight.shape and vnm.is_vnm(mask, v, m)
    assert updated[~mask].eq(0).all()
    assert mask.sum(1).max() <= 2 * -(-cols // m)

    def output_error(approximation):
        return (x @ (weight - approximation).T).norm()

    masks = [vnm.vnm_mask(vnm.importance(weight, c, x.norm(dim=0)), v, m) for c in ("abs", "wanda", "ria")]
    best_masking = min(output_error(weight * other) for other in masks)
    assert output_error(updated) < 0.95 * best_masking


def test_diagonal_hessian_keeps_weights_and_ranks_by_obs_saliency():
    # Uncorrelated inputs give nothing to compensate: the kept weights stay, and the mask maximises
    # w^2 * (H_jj + damping). An input that is always zero has its weights pruned.
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 30, generator=generator)
    diagonal = torch.rand(30, generator=generator) + 0.5
    diagonal[7] = 0.0
    updated, mask = reconstruct(weight, torch.diag(diagonal), v=16, m=6, damp=0.05)

    damped = torch.where(diagonal == 0, 1.0, diagonal) + 0.05 * torch.where(diagonal == 0, 1.0, diagonal).mean()
    alive = weight.clone()
    alive[:, 7] = 0
    assert torch.equal(mask, vnm.vnm_mask(alive.square() * damped, v=16, m=6))
    torch.testing.assert_close(updated, alive * mask, rtol=1e-6, atol=1e-6)
    assert not mask[:, 7].any()


def test_keeps_dtype_and_device_of_the_weight():
    weight = torch.randn(24, 20, dtype=torch.float16)
    x = torch.randn(64, 20)
    updated, mask = reconstruct(weight, x.T @ x, v=16, m=4)
    assert updated.dtype == torch.float16 and mask.dtype == torch.bool
    assert vnm.VNMWeight.from_dense(updated, 16, 4, mask=mask).to_dense().equal(updated)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(96, 80, generator=generator)
    x = correlated_inputs(320, 80, generator)
    cpu_weight, cpu_mask = reconstruct(weight, x.T @ x, v=16, m=5)
    gpu_weight, gpu_mask = reconstruct(weight.cuda(), (x.T @ x).cuda(), v=16, m=5)
    assert gpu_weight.is_cuda and vnm.is_vnm(gpu_mask.cpu(), 16, 5)
    # Rounding may flip a near-tie between masks; the outputs must stay equally good.
    cpu_error = (x @ (weight - cpu_weight).T).norm()
    gpu_error = (x @ (weight - gpu_weight.cpu()).T).norm()
    torch.testing.assert_close(gpu_error, cpu_error, rtol=1e-3, atol=0)
    assert (gpu_mask.cpu() == cpu_mask).float().mean() > 0.99


def test_rejects_bad_input():
    weight = torch.randn(8, 6)
    with pytest.raises(ValueError, match="hessian"):
        reconstruct(weight, torch.eye(5), v=16, m=4)
    with pytest.raises(ValueError, match="hessian is zero"):
        reconstruct(weight, torch.zeros(6, 6), v=16, m=4)
    with pytest.raises(ValueError, match="damp"):
        reconstruct(weight, torch.eye(6), v=16, m=4, damp=0)
    with pytest.raises(ValueError, match="m must be"):
        reconstruct(weight, torch.eye(6), v=16, m=3)
    with pytest.raises(ValueError, match="not positive definite"):
        reconstruct(weight, -torch.eye(6), v=16, m=4)


def test_hessian_accumulator_streams_over_batches():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    batches = [torch.randn(4, 8), torch.randn(2, 5, 8)]
    with torch.no_grad(), HessianAccumulator(model) as stats:
        for batch in batches:
            model(batch)
    inputs = torch.cat([b.reshape(-1, 8) for b in batches])
    hidden = torch.relu(model[0](inputs)).detach()
    hessians = stats.hessians()
    torch.testing.assert_close(hessians["0"], inputs.T @ inputs)
    torch.testing.assert_close(hessians["2"], hidden.T @ hidden)
    torch.testing.assert_close(stats.norms()["0"], inputs.norm(dim=0))


@pytest.mark.parametrize("rows, cols, v, m", [(70, 45, 16, 8), (40, 33, 16, 5)])
def test_kept_weights_are_the_least_squares_optimum_on_the_mask(rows, cols, v, m):
    # Float64 reference: per row, minimise ||X (w - w')|| + damping with w' zero off the row's mask.
    generator = torch.Generator().manual_seed(rows + m)
    weight = torch.randn(rows, cols, generator=generator)
    x = correlated_inputs(3 * cols, cols, generator)
    hessian = x.T @ x
    updated, mask = reconstruct(weight, hessian, v, m, damp=0.01)
    damped = hessian.double() + 0.01 * hessian.diagonal().mean().double() * torch.eye(cols, dtype=torch.float64)
    for row in range(rows):
        kept = mask[row].nonzero().squeeze(1)
        expected = torch.zeros(cols, dtype=torch.float64)
        expected[kept] = torch.linalg.solve(damped[kept][:, kept], (damped @ weight[row].double())[kept])
        torch.testing.assert_close(updated[row].double(), expected, rtol=1e-3, atol=1e-4)
