"""Importance of each weight (ABS, Wanda, RIA) and the activation statistics they need."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .config import CRITERIA


def importance(
    weight: torch.Tensor,
    criterion: str = "ria",
    act_norm: torch.Tensor | None = None,
    a: float = 0.5,
) -> torch.Tensor:
    """Non-negative float32 score per weight (out_features x in_features); larger = keep.

    abs:   |w|
    wanda: |w| * ||x_j||                     (needs act_norm)
    ria:   (|w| / sum_i |w_ij| + |w| / sum_j |w_ij|) * ||x_j||^a   (act_norm optional)
    act_norm is the L2 norm of each input channel over the calibration tokens (`activation_norms`).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("weight must be a 2-D tensor (out_features x in_features)")
    if act_norm is not None:
        if act_norm.shape != (weight.shape[1],):
            raise ValueError(f"act_norm must have shape ({weight.shape[1]},), got {tuple(act_norm.shape)}")
        act_norm = act_norm.to(device=weight.device, dtype=torch.float32)
    magnitude = weight.detach().float().abs()
    if criterion == "abs":
        return magnitude
    if criterion == "wanda":
        if act_norm is None:
            raise ValueError("criterion='wanda' needs act_norm (per-input-channel activation norms)")
        return magnitude * act_norm
    tiny = torch.finfo(torch.float32).tiny
    relative = magnitude / magnitude.sum(0, keepdim=True).clamp_min(tiny) + magnitude / magnitude.sum(
        1, keepdim=True
    ).clamp_min(tiny)
    return relative if act_norm is None else relative * act_norm.pow(a)


class ActivationNorms:
    """Streams per-input-channel squared norms of the inputs of every nn.Linear while active.

    Use as a context manager around any number of forward passes; nothing but one float64 vector
    per layer is kept. `norms()` gives name -> L2 norm over all tokens seen.
    """

    def __init__(self, model: nn.Module, module_types: tuple[type, ...] = (nn.Linear,)):
        self._targets = {name: mod for name, mod in model.named_modules() if isinstance(mod, module_types)}
        self._squares: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> ActivationNorms:
        for name, module in self._targets.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def accumulate(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            squares = x.reshape(-1, x.shape[-1]).double().square().sum(0)
            if name in self._squares:
                self._squares[name] += squares
            else:
                self._squares[name] = squares

        return accumulate

    def norms(self) -> dict[str, torch.Tensor]:
        return {name: squares.sqrt().float() for name, squares in self._squares.items()}


def activation_norms(
    model: nn.Module, batches: Iterable, module_types: tuple[type, ...] = (nn.Linear,)
) -> dict[str, torch.Tensor]:
    """Run `batches` (tensors, tuples of args, or dicts of kwargs) through `model` without grad and
    return each nn.Linear's (or `module_types`') per-input-channel activation L2 norm, keyed by module name."""
    with torch.no_grad(), ActivationNorms(model, module_types) as stats:
        for batch in batches:
            run_batch(model, batch)
    return stats.norms()


def run_batch(model: nn.Module, batch: Any) -> Any:
    """model(**batch) for a dict, model(*batch) for a tuple or list, else model(batch)."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
