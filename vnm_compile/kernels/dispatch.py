"""Which implementation runs a V:N:M linear: the decode kernel, the prefill kernel, or dense cuBLAS.

The choice is per (shape, pattern, dtype, token bucket) and comes from measurements on the GPU,
stored with the package in tables/<gpu>.json ("dispatch", written by benchmarks/kernels.py).
Dense cuBLAS on the decompressed weight is only an option when the caller keeps that weight (it
costs the dense memory); without it the sparse kernel runs anyway. Shapes the table lacks follow
its "rules" (measured crossovers), or DEFAULT_RULES on GPUs without a table.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .common import token_bucket
from .decode import launch_decode
from .op import channel_major
from .prefill import ROW_MAJOR_MAX_TOKENS, channel_index, expand_weight, launch_prefill, transpose, transpose_kernel
from .tuning import AUTOTUNED, gpu_slug, load_table, remember_tuned, table_key

PATHS = ("decode", "decode_split", "prefill", "dense")
DECODE_SPLIT_K = 4
DEFAULT_RULES = {"decode_max_tokens": 16, "dense_when_m_at_most": 5}
# With the dense weight kept, a sparse path runs only where it measured this much faster than cuBLAS:
# both timings move by a few percent from run to run, and a kept dense weight is there so that the
# layer never runs slower than dense.
SPARSE_MARGIN = 1.05


def choose_path(
    rows: int, cols: int, tokens: int, v: int, m: int, dtype: torch.dtype, device: torch.device, has_dense: bool
) -> str:
    """One of PATHS for this problem; 'dense' only when has_dense."""
    table = load_table(gpu_slug(device))
    measured = table["dispatch"].get(table_key(rows, cols, token_bucket(tokens), v, m, dtype))
    if measured is not None:
        if has_dense and measured["dense_us"] < SPARSE_MARGIN * measured["sparse_us"]:
            return "dense"
        return measured["path"]
    rules = {**DEFAULT_RULES, **table["rules"]}
    if has_dense and m <= rules["dense_when_m_at_most"]:
        return "dense"
    return "decode" if tokens <= rules["decode_max_tokens"] else "prefill"


def vnm_matmul(
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
    path: str | None = None,
    wrap: Callable | None = None,
    channel_major_out: bool = False,
) -> torch.Tensor:
    """y = x @ W.T + bias for a 2-D x [T, C]; `path` (one of PATHS) overrides the dispatcher.
    channel_major_out: y [T, R] laid out as a contiguous y.T (the prefill kernel writes it so; the
    other paths copy).

    expanded / channels are the prefill layouts (`expand_weight`, `channel_index`); the prefill
    path builds them on the fly when they are not given. `wrap` is torch.library.wrap_triton inside
    the triton_op, so that tracing records the kernel launches.
    """
    tokens, rows = x.shape[0], values.shape[0]
    path = path or choose_path(rows, in_features, tokens, v, m, x.dtype, x.device, dense is not None)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    wrap = wrap or (lambda kernel: kernel)
    if path == "dense":
        if dense is None:
            raise ValueError("path='dense' needs the decompressed weight (dense=...)")
        y = F.linear(x, dense, bias)
    elif tokens == 0:
        y = x.new_empty(0, rows)
    elif path == "prefill":
        expanded = expand_weight(values, metadata) if expanded is None else expanded
        channels = channel_index(columns, m) if channels is None else channels
        if x.t().is_contiguous():  # channel-major already: written so by its producer (passes/layout.py)
            xt = x.t()
        elif tokens <= ROW_MAJOR_MAX_TOKENS:
            xt = x.contiguous().t()
        else:
            xt = transpose(x.contiguous(), wrap(transpose_kernel))
        y = launch_prefill(wrap(AUTOTUNED[path]), xt, expanded, channels, bias, v, m, in_features,
                           channel_major_out=channel_major_out)
    else:
        split_k = DECODE_SPLIT_K if path == "decode_split" else 1
        y = launch_decode(wrap(AUTOTUNED[path]), x.contiguous(), values, columns, metadata, bias, v, m,
                          in_features, split_k=split_k)
    remember_tuned()
    if channel_major_out and y.stride(1) == 1:  # not written channel-major (or one token: the same)
        y = channel_major(y)
    return y
