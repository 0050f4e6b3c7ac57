"""What a V:N:M linear reads besides x, as one bundle for everything below the torch.library op."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Operands:
    """The compressed weight (`values`, `columns`, `metadata`, see format.VNMWeight), its pattern and
    input width, the bias, and the optional layouts a caller keeps beside it:
      dense     the masked weight in dense form (lets the dispatcher run cuBLAS where it measured faster);
      expanded  [R, 4G] each row's weight on its block's kept channels, and
      channels  [ceil(R/V), 4G] int32 those channels' indices: the prefill layout (`prefill_layout`);
      cslt      the masked weight compressed for cuSPARSELt (`cusparselt_weight`; M a multiple of 4, where a
                V:N:M weight is a valid 2:4 weight over its full width), for torch._cslt_sparse_mm;
      mma_values, mma_metadata, mma_columns  the sparse tensor-core kernel's layout (`sparse_mma.pack`:
                SparseMMALayout's tensors).
    """

    values: torch.Tensor
    columns: torch.Tensor
    metadata: torch.Tensor
    v: int
    m: int
    in_features: int
    bias: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    expanded: torch.Tensor | None = None
    channels: torch.Tensor | None = None
    cslt: torch.Tensor | None = None
    mma_values: torch.Tensor | None = None
    mma_metadata: torch.Tensor | None = None
    mma_columns: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.values.shape[0]

    @property
    def groups(self) -> int:
        return self.values.shape[1] // 2

    def op_arguments(self) -> tuple:
        """The operands in `torch.ops.vnm.linear`'s order (after x)."""
        return (self.values, self.columns, self.metadata, self.bias, self.v, self.m, self.in_features, self.dense,
                self.expanded, self.channels, self.cslt, self.mma_values, self.mma_metadata, self.mma_columns)


def channel_major(x: torch.Tensor) -> torch.Tensor:
    """x with the same shape and values, laid out channel-major (its last dimension slowest)."""
    order = (x.dim() - 1, *range(x.dim() - 1))
    return x.permute(order).contiguous().permute((*range(1, x.dim()), 0))
