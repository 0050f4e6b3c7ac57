"""The backward of `torch.ops.vnm.linear`: gradients with respect to x, the kept values and the bias.

For y = x @ W.T + b with W the dense weight the compressed tensors stand for (zero off the mask):
  dx      = dy @ W
  dvalues = (dy.T @ x) at the kept positions (the mask stays fixed: pruned weights get no gradient)
  dbias   = dy summed over the tokens
Plain torch on any device, so autograd and torch.compile trace it as they trace any other formula.
Memory, per call and transient: W dense ([R, C] in the values' dtype) when x needs a gradient, and
dy.T @ x ([R, G * m] in the compute dtype, float32 for half-precision inputs) when the values do;
no sparse kernel runs backwards yet.
"""

from __future__ import annotations

import torch

from ..format import kept_columns


def save_for_backward(ctx, inputs: tuple, output: torch.Tensor) -> None:
    """setup_context of vnm.linear: keeps what the gradients asked for need."""
    x, values, columns, metadata, bias, v, m, in_features = inputs[:8]
    needs_values = values.requires_grad
    ctx.save_for_backward(x if needs_values else None, values, columns, metadata)
    ctx.pattern = (v, m, in_features)


def backward(ctx, grad: torch.Tensor) -> tuple:
    """Gradients of vnm.linear's inputs: x, values and bias; None for the indices, the pattern and the
    caller's optional layouts (dense, expanded, channels, cslt: copies derived from the values)."""
    x, values, columns, metadata = ctx.saved_tensors
    v, m, in_features = ctx.pattern
    needs_x, needs_values, needs_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
    rows, padded = values.shape[0], columns.shape[1] * m
    index = kept_columns(columns, metadata, v, m)  # [R, 2G] into the padded columns
    tokens = grad.reshape(-1, rows)
    grad_x = grad_values = grad_bias = None
    if needs_x:
        dense = values.new_zeros(rows, padded).scatter_(1, index, values)[:, :in_features]
        grad_x = (tokens @ dense.to(grad.dtype)).reshape(*grad.shape[:-1], in_features)
    if needs_values:
        compute = torch.promote_types(x.dtype, torch.float32)
        inputs = torch.nn.functional.pad(x.reshape(-1, in_features).to(compute), (0, padded - in_features))
        grad_values = (tokens.to(compute).T @ inputs).gather(1, index).to(values.dtype)
    if needs_bias:
        grad_bias = tokens.sum(0)
    return grad_x, grad_values, None, None, grad_bias, None, None, None, None, None, None, None, None, None
