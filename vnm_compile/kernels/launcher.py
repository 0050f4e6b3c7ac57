"""Launching a Triton kernel through its compiled binary.

`kernel[grid](...)` binds and specialises every argument in Python on each call: tens of
microseconds for the V:N:M kernels, more than a decode step's kernel runs. A `BinaryLaunch` is made
from one ordinary launch (which compiles, or autotunes, as usual) and then calls that launch's
compiled binary directly with the kernel's arguments in parameter order, changing only the
arguments named `varying`. It serves calls whose varying arguments specialise as the first one's
did (`specialization`): Triton compiles separate binaries for integers equal to 1 or divisible by
16 and for 16-byte-aligned pointers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton
from triton.runtime.autotuner import Autotuner, Heuristics


def jit_function(kernel: Any) -> Any:
    """The kernel under its autotuning and heuristics wrappers (a JITFunction, or the interpreter's
    function): what names the arguments."""
    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def _heuristics(kernel: Any) -> list[dict[str, Callable]]:
    """The heuristics wrappers' rules, outermost first."""
    rules = []
    while isinstance(kernel, (Autotuner, Heuristics)):
        if isinstance(kernel, Heuristics):
            rules.append(kernel.values)
        kernel = kernel.fn
    return rules


def specialization(values: Sequence[Any]) -> tuple:
    """What Triton specialises a binary on, for these integer and tensor arguments."""
    key = []
    for value in values:
        if isinstance(value, torch.Tensor):
            key.append(value.data_ptr() % 16 == 0)
        elif isinstance(value, int):
            key.append((value == 1, value % 16 == 0))
        else:
            key.append(value)
    return tuple(key)


def launch_hooks_installed() -> bool:
    """Whether a launch hook (a profiler's) is installed. Recent Triton keeps each hook as a chain of
    calls, empty unless one is added: an empty chain is no hook."""
    runtime = triton.knobs.runtime  # read on every relaunch: no generator, no tuple
    return _installed(runtime.launch_enter_hook) or _installed(runtime.launch_exit_hook)


def _installed(hook: Any) -> bool:
    return hook is not None and bool(getattr(hook, "calls", True))


class BinaryLaunch:
    """Relaunches the binary of one ordinary launch of `kernel` (`compiled`, what `kernel[grid](...)`
    returned) whose arguments were `arguments` (by name, config included), varying only `varying`.
    `arguments` keeps the ones that are not tensors (the config, for the grid)."""

    def __init__(self, kernel: Any, compiled: Any, arguments: dict[str, Any], varying: Sequence[str], device: int):
        names = jit_function(kernel).arg_names
        arguments = dict(arguments)
        for rules in _heuristics(kernel):
            arguments.update({name: rule(arguments) for name, rule in rules.items()})
        # Tensors that do not vary are passed as their addresses: the binary keeps no reference to them.
        self._template = [value.data_ptr() if isinstance(value, torch.Tensor) else value
                          for value in (arguments[name] for name in names)]
        self.arguments = {name: value for name, value in arguments.items() if not isinstance(value, torch.Tensor)}
        self._positions = [names.index(name) for name in varying]
        self._compiled = compiled
        self._run = compiled.run
        self._function = compiled.function
        self._metadata = compiled.packed_metadata
        self._device = device

    def __call__(self, grid: tuple[int, int, int], *varying: Any) -> None:
        arguments = list(self._template)
        for position, value in zip(self._positions, varying):
            arguments[position] = value
        if launch_hooks_installed():
            self._compiled[grid](*arguments)  # a profiler's hooks: let Triton build their launch metadata
            return
        stream = torch._C._cuda_getCurrentRawStream(self._device)
        self._run(grid[0], grid[1], grid[2], stream, self._function, self._metadata, None, None, None, *arguments)
