"""Sequential (block by block) calibration and compression of a transformer's linears.

The calibration batches run through the model only up to its first block; from there on, one block
at a time: its linears' input statistics are gathered, its linears compressed, and the compressed
block is run again to produce the next block's inputs. Each block is thus calibrated on what the
already-compressed blocks before it really produce, and only one block's activations and statistics
are alive at any time, so a 7B model's calibration fits one GPU. With refinement (`config.refine`),
the dense model's hidden states are carried along too, as the targets of each block's refinement.
Which linears are compressed (`eligibility.skip_reason`) and how (`compression.compress`) is
decided as in every other entry.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import LayerStats, linear_module_types
from .compression import Compressed, compress, estimated_error, pruned
from .config import VNMConfig
from .eligibility import skip_reason
from .reconstruct import HessianAccumulator
from .refine import refine_block
from .scoring import ActivationNorms, importance, run_batch

log = logging.getLogger(__name__)

# A block replayed on stored inputs must not read or extend a key/value cache (transformers >= 5.25
# passes it as `cache`; the class check catches a cache under any other name).
_CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past", "use_cache", "cache")


def _is_cache_argument(name: str, value: Any) -> bool:
    return name in _CACHE_ARGUMENTS or any(cls.__name__ == "Cache" for cls in type(value).__mro__)


class _FirstBlockReached(Exception):
    pass


def compress_sequential(
    model: nn.Module,
    batches: Iterable,
    config: VNMConfig,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Compressed]:
    """Compress every linear (nn.Linear, or transformers' Conv1D) inside the model's repeated blocks,
    block by block.

    batches are calibration inputs (tensors, tuples of args, or dicts of kwargs for the model).
    The blocks are the largest nn.ModuleList of same-type modules (Llama's `model.layers`, BERT's
    `encoder.layer`, GPT-2's `h`); linears outside them (embeddings, lm_head) are left alone, as
    are those the config keeps dense (skip, only, exclude, min_features, dtypes, max_layer_error).
    config.method compresses each (e.g. "mask" by `config.criterion` on the activation norms of the
    block's inputs; "sparsegpt" reconstructs from their Hessians). Each block is processed on
    `device` (default: where it lives), on a copy: the model is not modified and may stay on the
    CPU. The model is compressed as it is (no channel permutation). config.refine then trains each
    compressed block's kept weights (`refine_block`, in the block's dtype) towards the dense model's
    output of that block, masks fixed.
    Returns the compressed weights (VNMWeight, or MaskedWeight for the N:M patterns; out_features x
    in_features, also for Conv1D, which stores its weight transposed) by module name, in the linears' dtype.
    """
    if not isinstance(config, VNMConfig):
        raise ValueError(f"config must be a VNMConfig, got {type(config).__name__}")
    prefix, blocks = _find_blocks(model)
    needs_inputs = (config.method != "mask" or config.criterion != "abs" or config.refine is not None
                    or config.max_layer_error is not None)
    inputs = _first_block_inputs(model, blocks[0], batches, device) if needs_inputs else []
    # Refinement's targets: the dense model's own hidden states at each block's output, so that a
    # refined block also corrects the error the compressed blocks before it let through.
    dense_states = [args[0] for args, _ in inputs] if config.refine is not None else []
    compressed: dict[str, Compressed] = {}
    for index, original in enumerate(tqdm(blocks, desc="compress blocks", disable=not progress)):
        block = copy.deepcopy(original)
        if device is not None:
            block.to(device)
        block_name = f"{prefix}.{index}"
        linears = _eligible_linears(block, block_name, config)
        if dense_states:
            dense_states = _outputs(block, inputs, dense_states)
        statistics = _block_statistics(block, inputs, config)
        masks = {}
        for name, linear in linears.items():
            dense = _oriented(linear)
            stats = statistics.get(name)
            act_norm = stats.act_norm if stats is not None and config.criterion != "abs" else None
            weight = compress(dense, importance(dense, config.criterion, act_norm, config.ria_exponent), stats, config)
            if stats is not None and config.max_layer_error is not None:
                error = estimated_error(dense, weight, stats)
                if error > config.max_layer_error:
                    log.info("%s.%s stays dense: estimated output error %.3f exceeds max_layer_error=%g",
                             block_name, name, error, config.max_layer_error)
                    continue
            linear.weight.data = _oriented(linear, weight.to_dense())
            masks[name] = _oriented(linear, weight.mask())
            compressed[f"{block_name}.{name}"] = weight
        if dense_states and masks:
            start = time.perf_counter()
            refine = config.refine
            losses = refine_block(block, masks, inputs, dense_states, refine.steps, refine.lr, refine.batch)
            log.info("%s refined in %.1f s: relative output error %.4g at the first step, %.4g at the last",
                     block_name, time.perf_counter() - start, losses[0], losses[-1])
            for name, linear in linears.items():
                if name not in masks:
                    continue
                compressed[f"{block_name}.{name}"] = pruned(_oriented(linear), _oriented(linear, masks[name]), config)
        if index + 1 < len(blocks) and inputs:
            _advance(block, inputs)
        del block
    return compressed


def block_linears(model: nn.Module, config: VNMConfig) -> dict[str, nn.Module]:
    """The linears `compress_sequential` compresses, by full module name: the eligible linears inside
    the model's repeated blocks."""
    prefix, blocks = _find_blocks(model)
    return {f"{prefix}.{index}.{name}": linear for index, block in enumerate(blocks)
            for name, linear in _eligible_linears(block, f"{prefix}.{index}", config).items()}


def _outputs(block: nn.Module, inputs: list[list], states: list[torch.Tensor]) -> list[torch.Tensor]:
    """The block's outputs on `states` in place of the stored inputs' hidden states."""
    with torch.no_grad():
        return [_first_output(block(state, *args[1:], **kwargs)) for state, (args, kwargs) in zip(states, inputs)]


def _first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    candidates = [
        (sum(p.numel() for p in modules.parameters()), name, modules)
        for name, modules in model.named_modules()
        if isinstance(modules, nn.ModuleList) and len(modules) and len({type(b) for b in modules}) == 1
    ]
    if not candidates:
        raise ValueError("model has no nn.ModuleList of repeated blocks (e.g. model.layers) to calibrate")
    _, name, blocks = max(candidates, key=lambda c: c[0])
    return name, blocks


def _first_block_inputs(model: nn.Module, first: nn.Module, batches: Iterable, device) -> list[list]:
    """The (args, kwargs) the first block receives for each calibration batch."""
    inputs: list[list] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = {k: value for k, value in kwargs.items() if not _is_cache_argument(k, value)}
        inputs.append([_to(list(args), device), _to(kwargs, device)])
        raise _FirstBlockReached

    handle = first.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    run_batch(model, batch)
                except _FirstBlockReached:
                    pass
    finally:
        handle.remove()
    if not inputs:
        raise ValueError("batches is empty: calibration needs at least one batch")
    return inputs


def _eligible_linears(block: nn.Module, block_name: str, config: VNMConfig) -> dict[str, nn.Module]:
    linears = {}
    for name, module in block.named_modules():
        if not isinstance(module, linear_module_types()):
            continue
        full_name = f"{block_name}.{name}"
        out_features, in_features = _oriented(module).shape
        reason = skip_reason(full_name, out_features, in_features, module.weight.dtype, config)
        if reason is not None:
            log.info("%s stays dense: %s", full_name, reason)
        else:
            linears[name] = module
    return linears


def _block_statistics(block: nn.Module, inputs: list[list], config: VNMConfig) -> dict[str, LayerStats]:
    """Per linear of the block, its inputs' statistics (with Hessians unless config.method is "mask")."""
    if not inputs:
        return {}
    hessians = config.method != "mask"
    collector = (HessianAccumulator if hessians else ActivationNorms)(block, linear_module_types())
    with torch.no_grad(), collector:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    found = collector.hessians() if hessians else {}
    return {name: LayerStats(norm, found.get(name)) for name, norm in collector.norms().items()}


def _oriented(linear: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The linear's weight (or `weight` laid out as it stores it), out x in: Conv1D stores in x out."""
    weight = linear.weight.detach() if weight is None else weight
    return weight if isinstance(linear, nn.Linear) else weight.t().contiguous()


def _advance(block: nn.Module, inputs: list[list]) -> None:
    """Replace each stored input by the block's output: the next block's input."""
    with torch.no_grad():
        for stored in inputs:
            args, kwargs = stored
            args[0] = _first_output(block(*args, **kwargs))


def _to(value: Any, device) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value
