"""Torch's analysis of which arguments a Triton kernel launch reads and writes, done once per kernel
and arguments for vnm's kernels.

torch.compile works this out for every launch of a user-defined Triton kernel by compiling the
kernel to TTIR and walking it, and again at every stage that asks (functionalization, Inductor's
lowering), with no cache: tens of milliseconds a launch, where a 32-layer model's graph launches vnm's
kernels 128 times with a handful of distinct arguments. The analysis reads only the kernel and what
it turns the arguments into (a tensor: its dtype; a symbolic size: the value 2; anything else: the
value), so for the same kernel and the same such arguments it gives the same answer. vnm's kernels
get that answer from a cache keyed on exactly those; every other kernel is analysed as torch does.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import sympy
import torch

# The analysis' name: torch 2.11 asks which arguments a launch writes; later versions which it reads
# and writes. Same arguments in both.
_ANALYSES = ("identify_mutated_tensors", "identify_accessed_tensors")
_PACKAGE = __name__.split(".")[0]


def memoize_access_analysis() -> None:
    """Make torch's access analysis of user Triton kernels answer vnm's kernels from a cache (once per
    process; a torch without the analysis is left as it is)."""
    from torch._higher_order_ops import triton_kernel_wrap

    for name in _ANALYSES:
        analyse = getattr(triton_kernel_wrap, name, None)
        if analyse is not None and not hasattr(analyse, "cached_answers"):
            setattr(triton_kernel_wrap, name, _memoized(analyse))


def _memoized(analyse: Callable) -> Callable:
    answers: dict[tuple, tuple[Any, Any]] = {}

    @functools.wraps(analyse)
    def analyse_once(kernel, kwargs, tma_descriptor_metadata):
        key = _key(kernel, kwargs, tma_descriptor_metadata)
        if key is None:
            return analyse(kernel, kwargs, tma_descriptor_metadata)
        if key not in answers:  # the kernel kept with its answer, so that its id stays its own
            answers[key] = (kernel, analyse(kernel, kwargs, tma_descriptor_metadata))
        return copy.deepcopy(answers[key][1])  # callers own their answer, as they did

    analyse_once.cached_answers = answers
    return analyse_once


def _key(kernel, kwargs: dict[str, Any], tma_descriptor_metadata) -> tuple | None:
    """What the analysis of a vnm kernel launch depends on: the JITFunction and its arguments as the
    analysis sees them (an autotuner's first config among them, the one it compiles). None for any
    other kernel, or arguments the analysis would read more of than the key holds."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, Autotuner):  # a new one at every launch: its configs pruned for the shape
        if kernel.configs:
            kwargs = {**kwargs, **kernel.configs[0].kwargs}
        kernel = kernel.fn
    if tma_descriptor_metadata or not isinstance(kernel, JITFunction) or not _defined_in_vnm(kernel):
        return None
    arguments = []
    for name, value in sorted(kwargs.items()):
        seen = _as_analysed(value)
        if seen is None:
            return None
        arguments.append((name, seen))
    return id(kernel), tuple(arguments)


def _as_analysed(value) -> tuple | None:
    """`value` as the analysis sees it (torch's generate_ttir), or None where that is not just a dtype
    or a plain value."""
    from torch._inductor.ir import TensorBox
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
        return ("int", 2)
    if isinstance(value, (FakeTensor, TensorBox)):
        return (type(value).__name__, value.dtype)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return (type(value).__name__, value)
    return None


def _defined_in_vnm(kernel) -> bool:
    return kernel.fn.__module__.split(".")[0] == _PACKAGE
