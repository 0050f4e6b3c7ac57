import pytest
import torch

import vnm_compile as vnm

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def relative_error(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 17, 129])
@pytest.mark.parametrize("rows,cols,v,m", [(100, 77, 16, 5), (64, 64, 64, 8), (130, 200, 32, 16), (33, 12, 16, 4)])
def test_reference_op_matches_float64(dtype, tokens, rows, cols, v, m):
    weight = vnm.VNMWeight.from_dense(torch.randn(rows, cols).to(dtype), v, m)
    x = torch.randn(tokens, cols).to(dtype)
    bias = torch.randn(rows).to(dtype)
    dense = weight.to_dense().double()
    ref = x.double() @ dense.T + bias.double()
    out = vnm.vnm_linear(x, weight, bias)
    assert out.dtype == dtype and out.shape == (tokens, rows)
    assert relative_error(out, ref) < TOLERANCE[dtype]
    assert relative_error(vnm.vnm_linear(x, weight), x.double() @ dense.T) < TOLERANCE[dtype]


def test_reference_op_keeps_leading_dimensions():
    weight = vnm.VNMWeight.from_dense(torch.randn(48, 40), 16, 8)
    x = torch.randn(2, 3, 5, 40)
    out = vnm.vnm_linear(x, weight)
    assert out.shape == (2, 3, 5, 48)
    torch.testing.assert_close(out, x @ weight.to_dense().T, rtol=1e-5, atol=1e-5)


def test_reference_op_chunks_row_blocks(monkeypatch):
    from vnm_compile.kernels import reference

    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 1)  # one row block per chunk
    weight = vnm.VNMWeight.from_dense(torch.randn(100, 50), 16, 5)
    x = torch.randn(7, 50)
    torch.testing.assert_close(vnm.vnm_linear(x, weight), x @ weight.to_dense().T, rtol=1e-5, atol=1e-5)


def test_opcheck():
    weight = vnm.VNMWeight.from_dense(torch.randn(40, 30), 16, 6)
    for x, bias in ((torch.randn(5, 30), torch.randn(40)), (torch.randn(2, 3, 30), None)):
        args = (x, weight.values, weight.columns, weight.metadata, bias, weight.v, weight.m, weight.in_features)
        torch.library.opcheck(torch.ops.vnm.linear.default, args)


def _op_inputs(rows, cols, v, m, tokens, dtype=torch.float64, seed=0):
    """The op's tensor inputs for a random weight, in `dtype` (float64 for gradcheck: the op takes it,
    VNMWeight does not)."""
    torch.manual_seed(seed)
    weight = vnm.VNMWeight.from_dense(torch.randn(rows, cols), v, m)
    return (torch.randn(*tokens, cols, dtype=dtype), weight.values.to(dtype), weight.columns, weight.metadata,
            torch.randn(rows, dtype=dtype), weight)


@pytest.mark.parametrize("rows,cols,v,m,tokens", [(33, 12, 16, 4, (1,)), (40, 30, 16, 6, (3,)),
                                                  (20, 17, 16, 5, (2, 17)), (17, 9, 16, 8, (129,))])
def test_gradients_match_finite_differences(rows, cols, v, m, tokens):
    x, values, columns, metadata, bias, _ = _op_inputs(rows, cols, v, m, tokens)

    def op(x, values, bias):
        return torch.ops.vnm.linear(x, values, columns, metadata, bias, v, m, cols)

    inputs = (x.requires_grad_(), values.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(op, inputs, fast_mode=True)
    x.requires_grad_(False)
    assert torch.autograd.gradcheck(lambda values: op(x, values, None), (values,), fast_mode=True)


def test_gradients_match_the_masked_dense_layer():
    x, values, columns, metadata, bias, weight = _op_inputs(40, 30, 16, 6, (2, 5), torch.float32)
    dense = weight.to_dense().requires_grad_()
    x_dense = x.clone().requires_grad_()
    grad = torch.randn(2, 5, 40)
    torch.nn.functional.linear(x_dense, dense, bias).backward(grad)
    x.requires_grad_()
    values.requires_grad_()
    torch.ops.vnm.linear(x, values, columns, metadata, None, 16, 6, 30).backward(grad)
    torch.testing.assert_close(x.grad, x_dense.grad, rtol=1e-5, atol=1e-5)
    mask = weight.mask()
    expected = vnm.VNMWeight.from_dense(dense.grad * mask, 16, 6, mask=mask).values
    torch.testing.assert_close(values.grad, expected, rtol=1e-5, atol=1e-5)


def test_opcheck_with_gradients():
    x, values, columns, metadata, bias, _ = _op_inputs(40, 30, 16, 6, (5,), torch.float32)
    for needs in ((True, True, True), (True, False, False), (False, True, False)):
        args = (x.clone().requires_grad_(needs[0]), values.clone().requires_grad_(needs[1]), columns, metadata,
                bias.clone().requires_grad_(needs[2]), 16, 6, 30)
        torch.library.opcheck(torch.ops.vnm.linear.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 17, 129])
def test_gradients_on_cuda_match_the_masked_dense_layer(dtype, tokens):
    _, _, _, _, _, weight = _op_inputs(200, 120, 64, 8, (tokens,), torch.float32)
    weight = weight.to("cuda", dtype)
    x = torch.randn(tokens, 120, device="cuda", dtype=dtype, requires_grad=True)
    values = weight.values.clone().requires_grad_()
    grad = torch.randn(tokens, 200, device="cuda", dtype=dtype)
    torch.ops.vnm.linear(x, values, weight.columns, weight.metadata, None, 64, 8, 120).backward(grad)
    dense = weight.to_dense().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    (x64 @ dense.T).backward(grad.double())
    mask = weight.mask()
    expected = vnm.VNMWeight.from_dense((dense.grad * mask).float(), 64, 8, mask=mask).values
    assert relative_error(x.grad, x64.grad) < TOLERANCE[dtype]
    assert relative_error(values.grad, expected.double()) < TOLERANCE[dtype]


def test_vnm_linear_trains_through_a_compressed_weight():
    weight = vnm.VNMWeight.from_dense(torch.randn(16, 16), 16, 8)
    x = torch.randn(2, 16, requires_grad=True)
    vnm.vnm_linear(x, weight).sum().backward()
    torch.testing.assert_close(x.grad, weight.to_dense().sum(0).expand(2, -1))


def test_bad_inputs_raise():
    weight = vnm.VNMWeight.from_dense(torch.randn(16, 24), 16, 8)
    with pytest.raises(ValueError, match="^x must be"):
        vnm.vnm_linear(torch.randn(3, 23), weight)
    with pytest.raises(ValueError, match="dtype"):
        vnm.vnm_linear(torch.randn(3, 24, dtype=torch.float16), weight)
    with pytest.raises(ValueError, match="^bias"):
        vnm.vnm_linear(torch.randn(3, 24), weight, torch.randn(15))
    with pytest.raises(TypeError, match="VNMWeight"):
        vnm.vnm_linear(torch.randn(3, 24), torch.randn(16, 24))
