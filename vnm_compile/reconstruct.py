"""One-shot V:N:M reconstruction: prune by the OBS saliency and update the kept weights (SparseGPT).

Pruning weight w_ij of a linear whose inputs have Hessian H = X^T X costs w_ij^2 / [H^-1]_jj in
output error, and the remaining weights of row i can absorb that error (optimal brain surgeon).
SparseGPT makes this one-shot: columns are pruned left to right and each pruned column's error is
pushed into the columns to its right, using the upper Cholesky factor of H^-1, so every column's
inverse Hessian is the one with the earlier columns already removed. Here each group of m columns is
given its V:N:M mask just before it is processed, from the saliencies of the already-updated weights.

That left-to-right pass never lets a pruned weight correct the kept weights to its left, so once the
mask is final the kept weights of each row are solved for exactly: the least-squares optimum of
||W X - W' X|| with W' zero off the mask. At 64:2:8 this lowers each layer's output error by about a
fifth over the pass alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import COLUMN_RULES, check_pattern
from .format import vnm_mask
from .scoring import ActivationNorms

# Columns updated together before the rest of the matrix sees their error (SparseGPT's lazy batch).
BLOCK_COLUMNS = 128
# Rows whose kept-weight systems are solved in one batched Cholesky (bounds its memory).
REFIT_ROWS = 64


def reconstruct(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    v: int,
    m: int,
    damp: float = 0.01,
    column_select: str = "optimal",
    block_columns: int = BLOCK_COLUMNS,
    group_mask: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` (R x C) to V:N:M and update its kept weights to preserve W X.

    group_mask(saliency) -> bool mask of the same R x m shape chooses each group's mask instead of
    V:N:M (another pattern whose masks lie within groups of m columns: N:M, transposable N:M).

    hessian is X^T X (C x C) over the calibration inputs X of the layer (`HessianAccumulator`);
    its scale does not matter. damp adds damp * mean(diag H) to the diagonal so H is invertible.
    Inputs that were always zero (H_jj = 0) have their weights pruned first. The math runs in
    float32 on the weight's device. Returns the updated weight (zero where pruned, weight's dtype):
    per row, the kept weights that minimise the damped output error on the mask; and its boolean
    V:N:M mask.
    """
    check_pattern(v, m, allow_small_v=True)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError("weight must be a 2-D floating-point tensor (out_features x in_features)")
    cols = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be a {cols}x{cols} tensor (X^T X of the layer's inputs), "
                         f"got {getattr(hessian, 'shape', type(hessian).__name__)}")
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not 0 < damp <= 1:
        raise ValueError(f"damp must be a number in (0, 1] (fraction of the mean Hessian diagonal), got {damp!r}")
    if column_select not in COLUMN_RULES:
        raise ValueError(f"column_select must be one of {COLUMN_RULES}, got {column_select!r}")
    if not isinstance(block_columns, int) or block_columns < 1:
        raise ValueError(f"block_columns must be a positive integer, got {block_columns!r}")

    # Transposed (C x R), so that a column of W, and every update of the columns after it, is contiguous.
    work = weight.detach().T.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    hessian = hessian.detach().to(device=work.device, dtype=torch.float32, copy=True)
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian has non-finite entries")
    dead = hessian.diagonal() == 0
    if dead.all():
        raise ValueError("hessian is zero: the layer saw no (non-zero) calibration inputs")
    hessian.diagonal()[dead] = 1.0
    work[dead] = 0.0
    hessian.diagonal().add_(damp * hessian.diagonal().mean())
    inverse_factor = _upper_cholesky_of_inverse(hessian, damp)
    original = work.T.contiguous()

    mask = torch.zeros(work.shape, dtype=torch.bool, device=work.device)
    # Blocks start at multiples of m, so every group of m columns lies inside one block.
    width = max(m, block_columns // m * m)
    for start in range(0, cols, width):
        end = min(start + width, cols)
        block, block_mask = work[start:end], mask[start:end]
        factor = inverse_factor[start:end, start:end]
        diagonal = factor.diagonal()
        errors = torch.empty_like(block)
        for j in range(end - start):
            if j % m == 0:
                group = slice(j, j + m)
                saliency = block[group].square() / diagonal[group, None].square()
                block_mask[group] = (group_mask(saliency.T) if group_mask is not None
                                     else vnm_mask(saliency.T, v, m, column_select)).T
            error = block[j].masked_fill(block_mask[j], 0.0) / diagonal[j]
            # Column j becomes its kept part; the columns after it absorb the pruned part.
            block[j:].addr_(factor[j, j:], error, alpha=-1.0)
            errors[j] = error
        work[end:].addmm_(inverse_factor[start:end, end:].T, errors, alpha=-1.0)
    mask = mask.T.contiguous()
    return _refit(original, hessian, mask).to(weight.dtype), mask


def _refit(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row of `weight` (R x C), the kept weights w' (zero off `mask`) minimising
    (w - w')^T H (w - w'): H_KK w'_K = (H w)_K on the row's kept columns K. hessian must be
    positive definite (damped). Rows keep at most 2 of every m columns, so each system is small.
    """
    hessian = hessian.to(torch.float32)
    kept = int(mask.sum(1).max())
    # Each row's kept columns first; rows that keep fewer are padded with identity equations.
    columns = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :kept]
    valid = mask.gather(1, columns)
    targets = (weight.to(torch.float32) @ hessian).gather(1, columns) * valid
    fitted = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for start in range(0, len(weight), REFIT_ROWS):
        rows = slice(start, start + REFIT_ROWS)
        index, used = columns[rows], valid[rows]
        systems = hessian[index[:, :, None], index[:, None, :]]
        systems = torch.where(used[:, :, None] & used[:, None, :], systems, torch.diag_embed((~used).float()))
        factor, info = torch.linalg.cholesky_ex(systems)
        if info.any():  # float32 lost definiteness on an ill-conditioned row: redo the rows in float64
            factor = torch.linalg.cholesky(systems.double()).float()
        solution = torch.cholesky_solve(targets[rows, :, None], factor)[..., 0]
        fitted[rows].scatter_(1, index, solution * used)
    return fitted


def _upper_cholesky_of_inverse(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """U with U^T U = H^-1: row j of U holds column j's inverse Hessian once columns < j are gone."""
    lower, info = torch.linalg.cholesky_ex(hessian)
    if int(info):
        raise ValueError(f"the damped Hessian is not positive definite; increase damp (now {damp})")
    # cholesky_solve against the identity is several times faster than cholesky_inverse on CPU.
    inverse = torch.cholesky_solve(torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device), lower)
    return torch.linalg.cholesky(inverse, upper=True)


class HessianAccumulator(ActivationNorms):
    """Streams H = X^T X of the inputs of every nn.Linear (or `module_types`) while active.

    A context manager like `ActivationNorms`, whose `norms()` it also gives (the square root of
    H's diagonal). One float32 C x C matrix per layer is kept, whatever the number of tokens.
    """

    def _hook(self, name: str):
        def accumulate(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            if name in self._squares:
                self._squares[name].addmm_(x.T, x)
            else:
                self._squares[name] = x.T @ x

        return accumulate

    def hessians(self) -> dict[str, torch.Tensor]:
        return dict(self._squares)

    def norms(self) -> dict[str, torch.Tensor]:
        return {name: hessian.diagonal().clamp_min(0).sqrt() for name, hessian in self._squares.items()}
