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


def test_backward_raises_clearly():
    weight = vnm.VNMWeight.from_dense(torch.randn(16, 16), 16, 8)
    x = torch.randn(2, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        vnm.vnm_linear(x, weight).sum().backward()


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
