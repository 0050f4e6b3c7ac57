"""Which implementation runs a V:N:M linear on CUDA, and running it: the decode kernel, the prefill
kernel, the sparse tensor-core kernel, cuSPARSELt over the full width, or dense cuBLAS.

The choice (`choose_path`) is per (shape, pattern, dtype, token bucket) and comes from measurements on
the GPU, stored with the package in tables/<gpu>.json ("dispatch", written by benchmarks/kernels.py).
Dense cuBLAS on the decompressed weight is only an option when the caller keeps that weight (it
costs the dense memory), cuSPARSELt only when the caller keeps its compressed copy (M a multiple
of 4, about 0.56 of the dense memory), the sparse tensor-core kernel only when the caller keeps its
layout (`sparse_mma.pack`) and the table holds its time; without them the Triton kernels run.
Shapes the table lacks follow its "rules" (measured crossovers), or DEFAULT_RULES on GPUs without a
table.

Two ways to run a call:
  - `kernel_linear`: choose, then launch through Triton (the eager call, and the traced body of
    vnm.linear in a graph whose token count is static, where Inductor emits the launches itself);
  - `planned_linear`: the body of vnm.linear_dispatched, for graphs whose token count is symbolic.
    The choice and the kernels' configs are made once per weight and token bucket (a `_Plan`), and
    later calls relaunch the compiled binaries (`BinaryLaunch`): a few microseconds of Python a call.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .access_analysis import memoize_access_analysis
from .common import planned_count, token_bucket
from .decode import decode_arguments, decode_grid, decode_input, decode_output, decode_result, launch_decode
from .launcher import BinaryLaunch, jit_function, specialization
from .operands import Operands, channel_major
from .prefill import (
    ROW_MAJOR_MAX_TOKENS,
    channel_index,
    expand_weight,
    launch_prefill,
    prefill_arguments,
    prefill_grid,
    prefill_output,
    transpose_kernel,
)
from .sparse_mma import SparseMMALayout, default_config, sparse_mma_linear
from .tuning import AUTOTUNED, gpu_slug, load_table, remember_tuned, table_key

# Loaded where torch.compile traces the kernels into a graph, which asks torch to analyse every launch.
memoize_access_analysis()
PATHS = ("decode", "decode_split", "prefill", "sparse_mma", "dense", "cusparselt")
# The optional operands (see Operands) each path reads; the others read none.
PATH_OPERANDS = {"prefill": ("expanded", "channels"), "dense": ("dense",), "cusparselt": ("cslt",),
                 "sparse_mma": ("mma_values", "mma_metadata", "mma_columns")}
DECODE_SPLIT_K = 4
# cuSPARSELt measured 1.30-1.58x cuBLAS on the Llama-2-7B shapes at 2048-8192 tokens (H100), where the
# V:N:M prefill kernel at M = 8 is 0.8-1.1x; at M = 16 the prefill kernel is faster.
DEFAULT_RULES = {"decode_max_tokens": 16, "dense_when_m_at_most": 5, "cusparselt_when_m_at_most": 8}
# With the dense weight kept, a sparse path runs only where it measured this much faster than cuBLAS:
# both timings move by a few percent from run to run, and a kept dense weight is there so that the
# layer never runs slower than dense.
SPARSE_MARGIN = 1.05
TRANSPOSE_BLOCK = 64
CUSPARSELT_TOKEN_MULTIPLE = 8  # its fp16/bf16 alignment of the dense operand


def choose_path(rows: int, cols: int, tokens: int, v: int, m: int, dtype: torch.dtype, device: torch.device,
                has_dense: bool, has_cslt: bool = False, has_mma: bool = False) -> str:
    """One of PATHS for this problem; 'dense' only when has_dense, 'cusparselt' only when has_cslt,
    'sparse_mma' only when has_mma and measured. A symbolic token count is planned as `planned_count` says."""
    tokens = planned_count(tokens)
    table = load_table(gpu_slug(device))
    rules = {**DEFAULT_RULES, **table["rules"]}
    measured = table["dispatch"].get(table_key(rows, cols, token_bucket(tokens), v, m, dtype))
    if measured is not None:
        best, best_us = measured["path"], measured["sparse_us"]
        for path, kept, key in (("sparse_mma", has_mma, "mma_us"), ("cusparselt", has_cslt, "cslt_us")):
            if kept and measured.get(key) is not None and measured[key] * SPARSE_MARGIN < best_us:
                best, best_us = path, measured[key]
        if has_dense and measured["dense_us"] < SPARSE_MARGIN * best_us:
            return "dense"
        return best
    if has_dense and m <= rules["dense_when_m_at_most"]:
        return "dense"
    if tokens <= rules["decode_max_tokens"]:
        return "decode"
    return "cusparselt" if has_cslt and m <= rules["cusparselt_when_m_at_most"] else "prefill"


def sparse_mma_pays(rows: int, cols: int, v: int, m: int, dtype: torch.dtype, device: torch.device,
                    has_dense: bool, has_cslt: bool) -> bool:
    """Whether the dispatcher would run the sparse tensor-core kernel on this weight at some token count,
    were its layout kept."""
    return any(choose_path(rows, cols, 1 << bucket, v, m, dtype, device, has_dense, has_cslt, has_mma=True)
               == "sparse_mma" for bucket in range(14))


def kernel_linear(
    x: torch.Tensor,
    operands: Operands,
    path: str | None = None,
    wrap: Callable | None = None,
    channel_major_out: bool = False,
) -> torch.Tensor:
    """y = x @ W.T + bias for a 2-D x [T, C]; `path` (one of PATHS) overrides the dispatcher.
    channel_major_out: y [T, R] laid out as a contiguous y.T (the prefill kernel writes it so; the
    other paths copy). `wrap` is torch.library.wrap_triton inside the triton_op, so that tracing
    records the kernel launches. The prefill layout is built on the fly where the operands lack it."""
    tokens = x.shape[0]
    path = path or choose_path(operands.rows, operands.in_features, tokens, operands.v, operands.m, x.dtype,
                               x.device, operands.dense is not None, operands.cslt is not None,
                               operands.mma_values is not None)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    wrap = wrap or (lambda kernel: kernel)
    if path == "dense":
        if operands.dense is None:
            raise ValueError("path='dense' needs the decompressed weight (Operands.dense)")
        y = F.linear(x, operands.dense, operands.bias)
    elif path == "cusparselt":
        if operands.cslt is None:
            raise ValueError("path='cusparselt' needs the cuSPARSELt copy (Operands.cslt, cusparselt_weight)")
        y = cusparselt_linear(x, operands.cslt, operands.bias)
    elif path == "sparse_mma":
        if operands.mma_values is None:
            raise ValueError("path='sparse_mma' needs the sparse tensor-core layout (Operands.mma_*, sparse_mma.pack)")
        config = mma_config(operands.rows, operands.in_features, tokens, operands.v, operands.m, x.dtype, x.device)
        y = torch.ops.vnm.sparse_mma(x, operands.mma_values, operands.mma_metadata, operands.mma_columns,
                                     operands.bias, operands.v, operands.m, operands.rows, operands.in_features,
                                     config, channel_major_out)
    elif isinstance(tokens, int) and tokens == 0:  # a symbolic count is at least 2 (torch specialises 0 and 1)
        y = x.new_empty(0, operands.rows)
    elif path == "prefill":
        expanded, channels = _prefill_layout(operands)
        transpose = lambda x, xt: wrap(transpose_kernel)[_transpose_grid(x)](
            x, xt, x.shape[0], x.shape[1], BLOCK_T=TRANSPOSE_BLOCK, BLOCK_C=TRANSPOSE_BLOCK)
        y = launch_prefill(wrap(AUTOTUNED[path]), _channels_first(x, transpose), expanded, channels, operands,
                           channel_major_out=channel_major_out)
    else:
        split_k = DECODE_SPLIT_K if path == "decode_split" else 1
        y = launch_decode(wrap(AUTOTUNED[path]), decode_input(x), operands, split_k=split_k)
    remember_tuned()
    if channel_major_out and y.stride(1) == 1:  # not written channel-major (or one token: the same)
        y = channel_major(y)
    return y


def mma_config(rows: int, cols: int, tokens: int, v: int, m: int, dtype: torch.dtype, device: torch.device) -> str:
    """The sparse tensor-core kernel's tile config for this problem: the one measured fastest (the
    table's), else the kernel's default for the token count."""
    measured = load_table(gpu_slug(device))["dispatch"].get(table_key(rows, cols, token_bucket(tokens), v, m, dtype))
    if measured is not None and measured.get("mma_config") is not None:
        return measured["mma_config"]
    return default_config(planned_count(tokens), v, m, device).name


def cusparselt_linear(x: torch.Tensor, cslt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y [T, R] = x @ W.T + bias by cuSPARSELt on W's compressed copy (written transposed: row-major y).
    cuSPARSELt refuses a token count that is not a multiple of CUSPARSELT_TOKEN_MULTIPLE: x is padded."""
    tokens = x.shape[0]
    if not (isinstance(tokens, int) and tokens % CUSPARSELT_TOKEN_MULTIPLE == 0):
        x = F.pad(x, (0, 0, 0, -tokens % CUSPARSELT_TOKEN_MULTIPLE))
    return torch._cslt_sparse_mm(cslt, x.t(), bias, transpose_result=True)[:tokens]


def _prefill_layout(operands: Operands) -> tuple[torch.Tensor, torch.Tensor]:
    expanded = operands.expanded if operands.expanded is not None else expand_weight(operands.values, operands.metadata)
    channels = operands.channels if operands.channels is not None else channel_index(operands.columns, operands.m)
    return expanded, channels


def _channels_first(x: torch.Tensor, transpose: Callable[[torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """x.T [C, T] for the prefill kernel: in place where x is channel-major already (written so by its
    producer, passes/layout.py) or small enough to stay in L2, else written by `transpose(x, xt)`."""
    if x.t().is_contiguous():
        return x.t()
    x = x.contiguous()
    if planned_count(x.shape[0]) <= ROW_MAJOR_MAX_TOKENS:
        return x.t()
    xt = torch.empty(x.shape[1], x.shape[0], dtype=x.dtype, device=x.device)
    transpose(x, xt)
    return xt


def _transpose_grid(x: torch.Tensor) -> tuple[int, int, int]:
    return -(-x.shape[0] // TRANSPOSE_BLOCK), -(-x.shape[1] // TRANSPOSE_BLOCK), 1


# Plans by the id of the weight's `values` tensor (dropped when it dies: a plan keeps only addresses),
# then by the call's kind: token bucket, dtype, x's layout, optional operands present. Keyed by id, not
# by the tensor, since tensors compare elementwise.
_PLANS: dict[int, dict[tuple, _Plan]] = {}


def planned_linear(x: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, metadata: torch.Tensor,
                   bias: torch.Tensor | None, v: int, m: int, in_features: int, dense: torch.Tensor | None,
                   expanded: torch.Tensor | None, channels: torch.Tensor | None, cslt: torch.Tensor | None,
                   mma_values: torch.Tensor | None, mma_metadata: torch.Tensor | None,
                   mma_columns: torch.Tensor | None, channel_major_out: bool) -> torch.Tensor:
    """vnm.linear on CUDA for any token count, by the plan made for this weight and token bucket."""
    x2 = x.reshape(-1, in_features)
    tokens = x2.shape[0]
    # x's layout by its channel stride, not its strides: a channel-major x's strides change with the count
    key = (token_bucket(tokens), x2.dtype, x2.stride(1) == 1, dense is not None, expanded is not None, cslt is not None,
           mma_values is not None, bias is not None, channel_major_out)
    plans = _PLANS.get(id(values))
    if plans is None:
        plans = _PLANS[id(values)] = {}
        weakref.finalize(values, _PLANS.pop, id(values), None)
    plan = plans.get(key)
    flat = (values, columns, metadata, v, m, in_features, bias, dense, expanded, channels, cslt, mma_values,
            mma_metadata, mma_columns)
    if plan is None:
        plan = plans[key] = _Plan(choose_path(values.shape[0], in_features, tokens, v, m, x2.dtype, x2.device,
                                              dense is not None, cslt is not None, mma_values is not None))
        if plan.path == "sparse_mma":
            plan.mma_config = mma_config(values.shape[0], in_features, tokens, v, m, x2.dtype, x2.device)
    y = plan(x2, flat, channel_major_out) if tokens else x2.new_empty(0, values.shape[0])
    if channel_major_out and y.stride(1) == 1 and tokens > 1:
        y = channel_major(y)
    return y.reshape(*x.shape[:-1], values.shape[0])


class _Plan:
    """One path for one weight and token bucket, and the binaries its kernels were compiled to, by the
    specialisation of the arguments that change from call to call."""

    def __init__(self, path: str):
        self.path = path
        self.mma_config: str | None = None  # the sparse tensor-core kernel's tile config, on that path
        self.binaries: dict[tuple, BinaryLaunch] = {}

    def __call__(self, x: torch.Tensor, flat: tuple, channel_major_out: bool) -> torch.Tensor:
        """y for a 2-D x; `flat` holds the Operands fields in order (built into an Operands only where a
        kernel is launched through Triton: the bundle costs a microsecond or two a call)."""
        bias, dense, cslt = flat[6], flat[7], flat[10]
        if self.path == "dense":
            return F.linear(x, dense, bias)
        if self.path == "cusparselt":
            return cusparselt_linear(x, cslt, bias)
        if self.path == "sparse_mma":
            values, v, m, in_features = flat[0], *flat[3:6]
            layout = SparseMMALayout(*flat[11:], v, m, values.shape[0], in_features)  # values, metadata, columns
            return sparse_mma_linear(x, layout, bias, self.mma_config, channel_major_out)
        if self.path == "prefill":
            return self._prefill(x, flat, channel_major_out)
        return self._decode(decode_input(x), flat)

    def _launch(self, kernel, grid: Callable[[dict], tuple], arguments: Callable[[], tuple[list, dict]],
                varying: dict[str, object], device: torch.device) -> None:
        """Run `kernel` on the grid its config gives: by the binary made for arguments that specialise
        as `varying` do (the arguments that change between calls, by name), else through Triton
        (compiling or autotuning as needed) with all its `arguments()`, keeping the binary."""
        key = (kernel, specialization(tuple(varying.values())))
        binary = self.binaries.get(key)
        if binary is not None:
            binary(grid(binary.arguments), *varying.values())
            return
        positional, constexprs = arguments()
        compiled = kernel[grid](*positional, **constexprs)
        config = getattr(kernel, "best_config", None)  # the autotuner's pick for this key
        named = {**dict(zip(jit_function(kernel).arg_names, positional)), **constexprs,
                 **(config.kwargs if config is not None else {})}
        self.binaries[key] = BinaryLaunch(kernel, compiled, named, tuple(varying), device.index)
        remember_tuned()

    def _decode(self, x: torch.Tensor, flat: tuple) -> torch.Tensor:
        rows, tokens, bias = flat[0].shape[0], x.shape[0], flat[6]
        split_k = DECODE_SPLIT_K if self.path == "decode_split" else 1
        y = decode_output(x, rows, split_k)
        self._launch(AUTOTUNED[self.path],
                     lambda meta: decode_grid(rows, tokens, split_k, meta["BLOCK_N"], meta["BLOCK_T"]),
                     lambda: decode_arguments(x, Operands(*flat), split_k, y),
                     {"x_ptr": x, **_bias_argument(bias), "y_ptr": y, "T": tokens, "stride_xt": x.stride(0),
                      "stride_xc": x.stride(1)}, x.device)
        return decode_result(y, x.dtype)

    def _prefill(self, x: torch.Tensor, flat: tuple, channel_major_out: bool) -> torch.Tensor:
        operands = Operands(*flat)
        expanded, channels = _prefill_layout(operands)
        rows, tokens = operands.rows, x.shape[0]
        transpose = lambda x, xt: self._launch(
            transpose_kernel, lambda meta: _transpose_grid(x),
            lambda: ([x, xt, tokens, x.shape[1]], dict(BLOCK_T=TRANSPOSE_BLOCK, BLOCK_C=TRANSPOSE_BLOCK)),
            {"x_ptr": x, "xt_ptr": xt, "T": tokens}, x.device)
        xt = _channels_first(x, transpose)
        y = prefill_output(xt, rows, channel_major_out)
        self._launch(AUTOTUNED["prefill"], lambda meta: prefill_grid(rows, tokens, meta["BLOCK_N"], meta["BLOCK_T"]),
                     lambda: prefill_arguments(xt, expanded, channels, operands, y),
                     # the layout may be built for this call alone, the bias be another tensor than the
                     # first call's: their addresses are passed on every call
                     {"x_ptr": xt, "w_ptr": expanded, "channel_ptr": channels, **_bias_argument(operands.bias),
                      "y_ptr": y, "T": tokens, "stride_xc": xt.stride(0), "stride_xt": xt.stride(1)}, x.device)
        return y


def _bias_argument(bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The bias among a relaunch's varying arguments. Without one there is nothing to pass: the kernel
    reads no bias (HAS_BIAS is false, and a plan serves calls with a bias or calls without)."""
    return {"bias_ptr": bias} if bias is not None else {}
