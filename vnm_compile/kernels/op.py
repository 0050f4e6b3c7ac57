"""`torch.ops.vnm.linear`: the V:N:M linear as a torch.library operator, and its Python entry.

It is a `triton_op`: torch.compile traces its body, so Inductor sees the Triton kernel launch
(through `wrap_triton`), writes the kernel into its generated code, and compiles the model with no
graph break. On CUDA the body dispatches to the Triton kernels (or dense cuBLAS, see dispatch.py);
on other devices it runs the reference implementation, registered as the CPU kernel too. In a graph
with a symbolic token count the body defers to `linear_at_run_time`, which dispatches per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.library import triton_op, wrap_triton

from ..format import VNMWeight
from .backward import backward, save_for_backward
from .reference import reference_linear


@torch.library.custom_op("vnm::linear_reference", mutates_args=())
def linear_reference(
    x: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    metadata: torch.Tensor,
    bias: torch.Tensor | None,
    v: int,
    m: int,
    in_features: int,
) -> torch.Tensor:
    """The reference, as an operator tracing does not enter: its chunking arithmetic on the token
    count would otherwise specialise a dynamic token dimension."""
    return reference_linear(x, values, columns, metadata, bias, v, m, in_features)


@linear_reference.register_fake
def _(x, values, columns, metadata, bias, v, m, in_features):
    return x.new_empty(*x.shape[:-1], values.shape[0])


@triton_op("vnm::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    metadata: torch.Tensor,
    bias: torch.Tensor | None,
    v: int,
    m: int,
    in_features: int,
    dense: torch.Tensor | None = None,
    expanded: torch.Tensor | None = None,
    channels: torch.Tensor | None = None,
    channel_major_out: bool = False,
) -> torch.Tensor:
    """dense, expanded, channels: optional layouts kept by the caller (see `vnm_linear`).
    channel_major_out: y laid out channel-major (see `channel_major`), for a consumer that reads it
    so (passes/layout.py); the values are the same."""
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, expected {in_features}")
    if x.device.type != "cuda":
        y = linear_reference(x, values, columns, metadata, bias, v, m, in_features)
        return channel_major(y) if channel_major_out else y
    if not all(isinstance(size, int) for size in x.shape):
        return linear_at_run_time(x, values, columns, metadata, bias, v, m, in_features, dense, expanded, channels,
                                  channel_major_out)
    return _dispatched(x, values, columns, metadata, bias, v, m, in_features, dense, expanded, channels,
                       channel_major_out, wrap_triton)


def channel_major(x: torch.Tensor) -> torch.Tensor:
    """x with the same shape and values, laid out channel-major (its last dimension slowest)."""
    order = (x.dim() - 1, *range(x.dim() - 1))
    return x.permute(order).contiguous().permute((*range(1, x.dim()), 0))


def _dispatched(x, values, columns, metadata, bias, v, m, in_features, dense, expanded, channels, channel_major_out,
                wrap=None):
    """The CUDA body: x flattened to [T, C] for the dispatcher, its leading dims restored."""
    from .dispatch import vnm_matmul  # imported on first CUDA use: keeps the Triton kernels unloaded on CPU

    y = vnm_matmul(x.reshape(-1, in_features), values, columns, metadata, bias, v, m, in_features,
                   dense=dense, expanded=expanded, channels=channels, wrap=wrap, channel_major_out=channel_major_out)
    return y.reshape(*x.shape[:-1], values.shape[0])  # a view of either layout: the token dims stay contiguous


@torch.library.custom_op("vnm::linear_at_run_time", mutates_args=())
def linear_at_run_time(
    x: torch.Tensor,
    values: torch.Tensor,
    columns: torch.Tensor,
    metadata: torch.Tensor,
    bias: torch.Tensor | None,
    v: int,
    m: int,
    in_features: int,
    dense: torch.Tensor | None,
    expanded: torch.Tensor | None,
    channels: torch.Tensor | None,
    channel_major_out: bool,
) -> torch.Tensor:
    """vnm.linear for graphs whose token count is symbolic (dynamic shapes): an operator tracing does
    not enter, so the kernel, its config and the dense-or-sparse choice are picked per call from the
    real token count and the measured tables. Traced into such a graph, the kernels would be tuned
    once for the first token count seen and run with that config for every other one, and each
    token-count threshold of the dispatcher would add a guard (a recompile)."""
    y = _dispatched(x, values, columns, metadata, bias, v, m, in_features, dense, expanded, channels,
                    channel_major_out)
    if channel_major_out:  # the fake's strides, also on size-1 dims (where a view's may differ): the same memory
        y = y.as_strided(y.shape, channel_major(torch.empty(y.shape, device="meta")).stride())
    return y


@linear_at_run_time.register_fake
def _(x, values, columns, metadata, bias, v, m, in_features, dense, expanded, channels, channel_major_out):
    y = x.new_empty(*x.shape[:-1], values.shape[0])
    return channel_major(y) if channel_major_out else y


@linear.register_kernel("cpu")
def _(x, values, columns, metadata, bias, v, m, in_features, dense=None, expanded=None, channels=None,
      channel_major_out=False):
    y = linear_reference(x, values, columns, metadata, bias, v, m, in_features)
    return channel_major(y) if channel_major_out else y


# Gradients with respect to x, the kept values (masks fixed) and the bias: backward.py.
linear.register_autograd(backward, setup_context=save_for_backward)


def check_inputs(x: torch.Tensor, weight: VNMWeight, bias: torch.Tensor | None,
                 dense_weight: torch.Tensor | None, layout: "PrefillLayout | None" = None) -> None:
    """Raise early, naming the parameter, unless the arguments fit `weight`."""
    if not isinstance(weight, VNMWeight):
        raise TypeError(f"weight must be a VNMWeight, got {type(weight).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != weight.in_features:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be [..., {weight.in_features}] (the weight's in_features), got {shape}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x has dtype {x.dtype} but the weight is {weight.dtype}; cast one to match")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.device}")
    if bias is not None and (bias.shape != (weight.out_features,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be a [{weight.out_features}] {x.dtype} tensor on {x.device}, "
                         f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if dense_weight is not None and (dense_weight.shape != weight.shape or dense_weight.dtype != x.dtype
                                     or dense_weight.device != x.device):
        raise ValueError(f"dense_weight must be weight.to_dense(): a {tuple(weight.shape)} {x.dtype} tensor on "
                         f"{x.device}, got {tuple(dense_weight.shape)} {dense_weight.dtype} on {dense_weight.device}")
    if layout is not None and not isinstance(layout, PrefillLayout):
        raise TypeError(f"layout must be a PrefillLayout (prefill_layout(weight)), got {type(layout).__name__}")
    if layout is not None and (layout.expanded.shape != (weight.out_features, 4 * weight.groups)
                               or layout.expanded.dtype != x.dtype or layout.expanded.device != x.device):
        raise ValueError(f"layout must be prefill_layout(weight) of this weight, got an expanded weight of "
                         f"{tuple(layout.expanded.shape)} {layout.expanded.dtype} on {layout.expanded.device}")


@dataclass(frozen=True)
class PrefillLayout:
    """What the prefill kernel reads besides x, built once per weight by `prefill_layout`.

    expanded [R, 4G] (weight dtype): each row's weight on its block's kept channels, 4/M of the
    dense weight's bytes (50% at M = 8, 25% at M = 16); channels [ceil(R/V), 4G] int32: those
    channels' indices (4 bytes per kept column per row block, small).
    """

    expanded: torch.Tensor
    channels: torch.Tensor


def prefill_layout(weight: VNMWeight) -> PrefillLayout:
    """The prefill layouts of `weight`; keep them to spare the prefill path building them per call."""
    from .prefill import channel_index, expand_weight

    return PrefillLayout(expand_weight(weight.values, weight.metadata), channel_index(weight.columns, weight.m))


def vnm_linear(
    x: torch.Tensor,
    weight: VNMWeight,
    bias: torch.Tensor | None = None,
    dense_weight: torch.Tensor | None = None,
    layout: PrefillLayout | None = None,
) -> torch.Tensor:
    """y = x @ weight.T + bias for a V:N:M weight; x is [..., in_features], y is [..., out_features].

    Differentiable with respect to x and bias, and to weight.values when they require grad (the
    mask stays fixed; backward.py says what the backward materialises).

    Optional memory-for-speed layouts, kept by the caller:
      dense_weight = weight.to_dense() (the dense memory): the dispatcher uses cuBLAS where
        measurements show dense is faster for this shape and token count;
      layout = prefill_layout(weight) (4/M of the dense memory): otherwise the prefill kernel
        (many tokens) builds it on every call.
    """
    check_inputs(x, weight, bias, dense_weight, layout)
    expanded, channels = (layout.expanded, layout.channels) if layout is not None else (None, None)
    return linear(x, weight.values, weight.columns, weight.metadata, bias, weight.v, weight.m, weight.in_features,
                  dense_weight, expanded, channels)
