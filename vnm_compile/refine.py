"""Block-wise refinement: after one-shot compression, train a block's kept weights to match its outputs.

One-shot reconstruction fits each linear on its own, to its own dense output. The block's output is
what the rest of the model reads, and it bends the errors of several linears together (through the
attention softmax and the gated MLP). With the masks fixed, a few dozen Adam steps on the kept
weights, minimising the mean squared error between the compressed block's outputs and the dense
outputs on the calibration inputs, fold that interaction back in. Still post-training: no labels,
no loss beyond the block, one block's activations at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def refine_block(
    block: nn.Module,
    masks: dict[str, torch.Tensor],
    inputs: list[list],
    targets: list[torch.Tensor],
    steps: int,
    lr: float,
    batch: int = 1,
    seed: int = 0,
    extra: Iterable[nn.Parameter] = (),
) -> list[float]:
    """Train, in place, the weights of `block`'s submodules named in `masks` (weights laid out as
    the modules store them, True = kept) so that block(*args, **kwargs)'s first output matches
    `targets` (one per stored (args, kwargs) input). Pruned weights stay exactly zero. The
    parameters in `extra` (say biases and norms) are trained with them, whole; every other
    parameter of the block stays as it is. Each step averages the gradients of `batch`
    calibration inputs, drawn in a shuffled order (inputs may differ in length, so they are not
    stacked); the learning rate decays to zero along a cosine. Returns the loss of each step (the
    mean over its inputs), relative to the target's mean square.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < 1:
        raise ValueError(f"lr must be a number in (0, 1), got {lr!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive integer (calibration inputs per step), got {batch!r}")
    if len(inputs) != len(targets) or not inputs:
        raise ValueError("inputs and targets must be non-empty and of one length, "
                         f"got {len(inputs)} and {len(targets)}")
    weights = {name: block.get_submodule(name).weight for name in masks}
    trained = [*weights.values(), *extra]
    trainable = {id(p) for p in trained}
    requires_grad = {parameter: parameter.requires_grad for parameter in block.parameters()}
    for parameter in requires_grad:
        parameter.requires_grad_(id(parameter) in trainable)
    optimizer = torch.optim.Adam(trained, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    try:
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = 0.0
                for _ in range(batch):
                    if not order:
                        order = torch.randperm(len(inputs), generator=generator).tolist()
                    index = order.pop()
                    args, kwargs = inputs[index]
                    target = targets[index]
                    error = (_first(block(*args, **kwargs)) - target).square().mean() / target.square().mean()
                    (error / batch).backward()
                    loss += error.item() / batch
                optimizer.step()
                schedule.step()
                with torch.no_grad():
                    for name, weight in weights.items():
                        weight.mul_(masks[name])
                losses.append(loss)
    finally:
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
            parameter.grad = None
    return losses


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output
