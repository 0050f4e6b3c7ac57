"""The reference V:N:M linear in plain torch: gather the kept columns, expand 2:4, matmul.

Runs on any device. It works one chunk of row blocks at a time, so neither the dense weight nor the
gathered activations of the whole matrix are ever materialised at once.
"""

from __future__ import annotations

import torch

from ..format import KEPT_COLUMNS, unpack_slots
from .operands import Operands

# Elements (gathered activations + expanded weight) one chunk may hold.
_CHUNK_ELEMENTS = 1 << 24


def reference_linear(x: torch.Tensor, operands: Operands) -> torch.Tensor:
    """y = x @ W.T (+ bias) for the V:N:M weight of `operands`; x is [..., in_features]. The optional
    layouts of `operands` are not read."""
    values, columns, metadata, bias = operands.values, operands.columns, operands.metadata, operands.bias
    v, m, in_features = operands.v, operands.m, operands.in_features
    rows, groups = values.shape[0], values.shape[1] // 2
    compute = torch.promote_types(x.dtype, torch.float32)
    tokens = x.reshape(-1, in_features).to(compute)
    tokens = torch.nn.functional.pad(tokens, (0, groups * m - in_features))
    slots = unpack_slots(metadata, groups)  # [R, G, 2]
    # Position of each stored value among its block's 4 * G kept columns.
    slot_position = (slots + KEPT_COLUMNS * torch.arange(groups, device=x.device)[:, None]).reshape(rows, -1)
    group_start = torch.arange(groups, device=x.device)[:, None] * m
    kept_columns = (columns.long() + group_start).reshape(columns.shape[0], -1)  # [R/v, 4G]
    out = torch.empty(tokens.shape[0], rows, dtype=compute, device=x.device)
    per_block = (tokens.shape[0] + v) * KEPT_COLUMNS * groups
    blocks_per_chunk = max(1, _CHUNK_ELEMENTS // per_block)
    for b0 in range(0, columns.shape[0], blocks_per_chunk):
        b1 = min(columns.shape[0], b0 + blocks_per_chunk)
        r0, r1 = b0 * v, min(rows, b1 * v)
        gathered = tokens[:, kept_columns[b0:b1].reshape(-1)].view(tokens.shape[0], b1 - b0, -1)
        expanded = torch.zeros(r1 - r0, KEPT_COLUMNS * groups, dtype=compute, device=x.device)
        expanded.scatter_(1, slot_position[r0:r1], values[r0:r1].to(compute))
        if (b1 - b0) * v != r1 - r0:  # the last block is short: pad its rows with zeros
            expanded = torch.nn.functional.pad(expanded, (0, 0, 0, (b1 - b0) * v - (r1 - r0)))
        partial = torch.einsum("tbk,bvk->tbv", gathered, expanded.view(b1 - b0, v, -1))
        out[:, r0:r1] = partial.reshape(tokens.shape[0], -1)[:, : r1 - r0]
    if bias is not None:
        out += bias.to(compute)
    return out.to(x.dtype).reshape(*x.shape[:-1], rows)
