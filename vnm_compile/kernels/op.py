"""The V:N:M linear as torch.library operators, and its Python entry `vnm_linear`.

`torch.ops.vnm.linear` is a `triton_op`: where the token count is static, torch.compile traces its
body, so Inductor sees the Triton kernel launches (through `wrap_triton`), writes the kernels into
its generated code, and compiles the model with no graph break. Its body defers to
`torch.ops.vnm.linear_dispatched`, an operator tracing does not enter, where the implementation is
only known when the call runs: on CPU (the reference, whose chunking arithmetic would otherwise
specialise a symbolic token count) and on CUDA with a symbolic token count that the caller does not
ask to plan for (`plan_symbolic`), where the kernel and its config are picked per call from the real
size (`planned_linear`). Traced into such a graph, the kernels are chosen once, for the largest count
the symbol's range allows (the backend narrows it to a bucket of small counts); each token-count
threshold of the dispatcher would otherwise add a guard (a recompile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.library import triton_op, wrap_triton

from ..format import VNMWeight
from .backward import backward, save_for_backward
from .operands import Operands, channel_major
from .reference import reference_linear
from .sparse_mma import SparseMMALayout, sparse_mma_linear


def static_count(sizes: tuple[int | torch.SymInt, ...]) -> int | None:
    """The product of `sizes` where each is known while tracing: a plain int, or a symbol its shape
    environment replaced by a value; None where one varies. Each size is read on its own, without
    symbolic arithmetic, which would specialise or cache."""
    count = 1
    for size in sizes:
        if not isinstance(size, int):
            size = size.node.shape_env.replace(size.node.expr)
            if not size.is_Integer:
                return None
        count *= int(size)
    return count


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
    cslt: torch.Tensor | None = None,
    mma_values: torch.Tensor | None = None,
    mma_metadata: torch.Tensor | None = None,
    mma_columns: torch.Tensor | None = None,
    channel_major_out: bool = False,
    plan_symbolic: bool = False,
) -> torch.Tensor:
    """y = x @ W.T + bias for the V:N:M weight (values, columns, metadata) of pattern v:2:m over
    in_features inputs; dense, expanded, channels, cslt, mma_*: optional layouts kept by the caller (see
    `Operands`). channel_major_out: y laid out channel-major (see `channel_major`), for a consumer
    that reads it so (passes/layout.py); the values are the same. plan_symbolic: a symbolic token count
    takes the kernels chosen for the largest count its range allows (`planned_count`: a bucket's largest,
    or many tokens where unbounded), traced into the graph, where it otherwise takes the per-call op;
    the backend sets it where its small counts run in graphs of their own. Any count gives the same
    values."""
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, expected {in_features}")
    path = traced_path(x, values.shape[0], in_features, v, m, dense is not None, cslt is not None,
                       mma_values is not None, plan_symbolic)
    if path is None:
        return torch.ops.vnm.linear_dispatched(x, values, columns, metadata, bias, v, m, in_features, dense, expanded,
                                               channels, cslt, mma_values, mma_metadata, mma_columns,
                                               channel_major_out)
    from .dispatch import kernel_linear

    operands = Operands(values, columns, metadata, v, m, in_features, bias, dense, expanded, channels, cslt,
                        mma_values, mma_metadata, mma_columns)
    y = kernel_linear(x.reshape(-1, in_features), operands, path, wrap=wrap_triton, channel_major_out=channel_major_out)
    return y.reshape(*x.shape[:-1], values.shape[0])  # a view of either layout: the token dims stay contiguous


def traced_path(x: torch.Tensor, rows: int, in_features: int, v: int, m: int, has_dense: bool, has_cslt: bool,
                has_mma: bool, plan_symbolic: bool) -> str | None:
    """The path (kernels/dispatch.py) vnm.linear's body launches for x where tracing enters it: on CUDA,
    where x's token count is static, or symbolic and planned for (plan_symbolic: the largest count its
    range allows); None where the op defers the choice to each call (vnm.linear_dispatched, which runs
    the reference on CPU)."""
    if x.device.type != "cuda":
        return None
    tokens = static_count(tuple(x.shape[:-1]))
    if tokens is None and not plan_symbolic:
        return None
    from .dispatch import choose_path  # imported on first CUDA use: keeps the Triton kernels unloaded on CPU

    return choose_path(rows, in_features, math.prod(x.shape[:-1]) if tokens is None else tokens, v, m, x.dtype,
                       x.device, has_dense, has_cslt, has_mma)


@linear.register_kernel("cpu")
def _(x, values, columns, metadata, bias, v, m, in_features, dense=None, expanded=None, channels=None, cslt=None,
      mma_values=None, mma_metadata=None, mma_columns=None, channel_major_out=False, plan_symbolic=False):
    return _reference(x, values, columns, metadata, bias, v, m, in_features, channel_major_out)


def _reference(x, values, columns, metadata, bias, v, m, in_features, channel_major_out):
    y = reference_linear(x, Operands(values, columns, metadata, v, m, in_features, bias))
    return channel_major(y) if channel_major_out else y


def _dispatched_reference(x, values, columns, metadata, bias, v, m, in_features, *layouts_then_channel_major_out):
    return _reference(x, values, columns, metadata, bias, v, m, in_features, layouts_then_channel_major_out[-1])


def _planned(x, values, columns, metadata, bias, v, m, in_features, dense, expanded, channels, cslt, mma_values,
             mma_metadata, mma_columns, channel_major_out):
    from .dispatch import planned_linear

    return planned_linear(x, values, columns, metadata, bias, v, m, in_features, dense, expanded, channels, cslt,
                          mma_values, mma_metadata, mma_columns, channel_major_out)


# A plain operator, not a custom_op: its call costs a few microseconds less, which a decode step of a
# large model pays a hundred times over.
_LIBRARY = torch.library.Library("vnm", "FRAGMENT")
_LIBRARY.define(
    "linear_dispatched(Tensor x, Tensor values, Tensor columns, Tensor metadata, Tensor? bias, int v, int m, "
    "int in_features, Tensor? dense, Tensor? expanded, Tensor? channels, Tensor? cslt, Tensor? mma_values, "
    "Tensor? mma_metadata, Tensor? mma_columns, bool channel_major_out) -> Tensor")
_LIBRARY.impl("linear_dispatched", _dispatched_reference, "CPU")
_LIBRARY.impl("linear_dispatched", _planned, "CUDA")


@torch.library.register_fake("vnm::linear_dispatched", lib=_LIBRARY)
def _(x, values, *arguments):
    y = x.new_empty(*x.shape[:-1], values.shape[0])
    return channel_major(y) if arguments[-1] else y


# The sparse tensor-core kernel is CUDA C++ launched through NVRTC, which tracing cannot enter: where
# vnm.linear's traced body takes that path, this operator is what the graph calls (Inductor: an
# extern kernel).
_LIBRARY.define(
    "sparse_mma(Tensor x, Tensor values, Tensor metadata, Tensor columns, Tensor? bias, int v, int m, "
    "int out_features, int in_features, str config, bool channel_major_out) -> Tensor")


def _sparse_mma(x, values, metadata, columns, bias, v, m, out_features, in_features, config, channel_major_out):
    layout = SparseMMALayout(values, metadata, columns, v, m, out_features, in_features)
    return sparse_mma_linear(x, layout, bias, config, channel_major_out)


_LIBRARY.impl("sparse_mma", _sparse_mma, "CUDA")


@torch.library.register_fake("vnm::sparse_mma", lib=_LIBRARY)
def _(x, values, metadata, columns, bias, v, m, out_features, in_features, config, channel_major_out):
    y = x.new_empty(x.shape[0], out_features)
    return channel_major(y) if channel_major_out else y


# Gradients with respect to x, the kept values (masks fixed) and the bias: backward.py.
linear.register_autograd(backward, setup_context=save_for_backward)


def check_inputs(x: torch.Tensor, weight: VNMWeight, bias: torch.Tensor | None,
                 dense_weight: torch.Tensor | None, layout: PrefillLayout | None = None,
                 mma: SparseMMALayout | None = None) -> None:
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
    if mma is not None and not isinstance(mma, SparseMMALayout):
        raise TypeError(f"mma must be a SparseMMALayout (sparse_mma.pack(weight)), got {type(mma).__name__}")
    if mma is not None and ((mma.v, mma.m, mma.out_features, mma.in_features) != (weight.v, weight.m, *weight.shape)
                            or mma.dtype != x.dtype or mma.device != x.device):
        raise ValueError(f"mma must be sparse_mma.pack(weight) of this weight, got a layout of {mma.v}:2:{mma.m}, "
                         f"{mma.out_features} x {mma.in_features}, {mma.dtype} on {mma.device}")


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


# cuSPARSELt's fp16/bf16 alignment of the sparse operand's rows and columns
CUSPARSELT_WEIGHT_MULTIPLE = 16


def cusparselt_refusal(weight: VNMWeight) -> str | None:
    """Why cuSPARSELt cannot take `weight` over its full width, or None where it can."""
    if weight.m % 4:
        return f"M = {weight.m} is not a multiple of 4 (a V:N:M row is then not 2:4)"
    if weight.out_features % CUSPARSELT_WEIGHT_MULTIPLE or weight.in_features % CUSPARSELT_WEIGHT_MULTIPLE:
        return (f"its {weight.out_features} x {weight.in_features} weight is not a multiple of "
                f"{CUSPARSELT_WEIGHT_MULTIPLE} both ways")
    if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16):
        return f"it takes fp16/bf16 CUDA weights, not {weight.dtype} on {weight.device.type}"
    return None


def cusparselt_weight(weight: VNMWeight) -> torch.Tensor:
    """`weight` compressed for cuSPARSELt over its full width (where `cusparselt_refusal` has no
    objection): about 0.56 of the dense bytes beside the V:N:M copy, for the dispatcher's cuSPARSELt path."""
    refusal = cusparselt_refusal(weight)
    if refusal is not None:
        raise ValueError(f"cuSPARSELt cannot take {weight!r}: {refusal}")
    return torch._cslt_compress(weight.to_dense().contiguous())


def operands(weight: VNMWeight, bias: torch.Tensor | None = None, dense_weight: torch.Tensor | None = None,
             layout: PrefillLayout | None = None, cslt: torch.Tensor | None = None,
             mma: SparseMMALayout | None = None) -> Operands:
    """The operands of a linear on `weight` with what the caller keeps beside it."""
    expanded, channels = (layout.expanded, layout.channels) if layout is not None else (None, None)
    mma_values, mma_metadata, mma_columns = (mma.values, mma.metadata, mma.columns) if mma is not None else (None,) * 3
    return Operands(weight.values, weight.columns, weight.metadata, weight.v, weight.m, weight.in_features, bias,
                    dense_weight, expanded, channels, cslt, mma_values, mma_metadata, mma_columns)


def vnm_linear(
    x: torch.Tensor,
    weight: VNMWeight,
    bias: torch.Tensor | None = None,
    dense_weight: torch.Tensor | None = None,
    layout: PrefillLayout | None = None,
    cslt: torch.Tensor | None = None,
    mma: SparseMMALayout | None = None,
) -> torch.Tensor:
    """y = x @ weight.T + bias for a V:N:M weight; x is [..., in_features], y is [..., out_features].

    Differentiable with respect to x and bias, and to weight.values when they require grad (the
    mask stays fixed; backward.py says what the backward materialises).

    Optional memory-for-speed layouts, kept by the caller:
      dense_weight = weight.to_dense() (the dense memory): the dispatcher uses cuBLAS where
        measurements show dense is faster for this shape and token count;
      layout = prefill_layout(weight) (4/M of the dense memory): otherwise the prefill kernel
        (many tokens) builds it on every call;
      cslt = cusparselt_weight(weight) (about 0.56 of the dense memory; M a multiple of 4): the
        dispatcher may run cuSPARSELt on many tokens;
      mma = sparse_mma.pack(weight) (about the compressed weight's bytes; v a multiple of 16, fp16/bf16,
        compute capability 8.0+): the dispatcher may run the sparse tensor-core kernel where it measured
        faster.
    """
    check_inputs(x, weight, bias, dense_weight, layout, mma)
    return linear(x, *operands(weight, bias, dense_weight, layout, cslt, mma).op_arguments())
