"""torch's analysis of what a Triton launch reads and writes: vnm's kernels are analysed once per kernel
and arguments as the analysis sees them, every other kernel at every launch."""

import inspect

import sympy
import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime.jit import JITFunction

from vnm_compile.kernels import access_analysis, decode


def python_function(kernel):
    while not inspect.isfunction(kernel):
        kernel = kernel.fn
    return kernel


def counting_analysis():
    calls = []

    def analyse(kernel, kwargs, tma_descriptor_metadata):
        calls.append(kwargs)
        return {"writes": ["y_ptr"], "seen": len(calls)}

    return access_analysis._memoized(analyse), calls


def fake_tensors(*dtypes):
    with FakeTensorMode():
        return [torch.empty(4, 8, dtype=dtype) for dtype in dtypes]


def launch_arguments(rows=4096, **changes):
    x, values, y = fake_tensors(torch.float16, torch.float16, torch.float16)
    return {"x_ptr": x, "values_ptr": values, "y_ptr": y, "R": rows, "V": 64, "HAS_BIAS": False, **changes}


def not_a_vnm_kernel(x_ptr, y_ptr):
    pass


def test_a_vnm_kernel_is_analysed_once_per_arguments_as_the_analysis_sees_them():
    analyse, calls = counting_analysis()
    kernel = JITFunction(python_function(decode.vnm_decode_kernel))
    first = analyse(kernel, launch_arguments(), {})
    again = analyse(kernel, launch_arguments(), {})  # other fake tensors of the same dtypes
    assert len(calls) == 1 and again == first and again is not first  # each caller owns its answer
    # torch analyses a symbolic size as the value 2, so a symbol and a literal 2 are one analysis
    analyse(kernel, launch_arguments(rows=sympy.Symbol("s0")), {})
    analyse(kernel, launch_arguments(rows=2), {})
    assert len(calls) == 2
    # another size, dtype or constexpr is analysed anew
    analyse(kernel, launch_arguments(rows=12288), {})
    analyse(kernel, launch_arguments(x_ptr=fake_tensors(torch.bfloat16)[0]), {})
    analyse(kernel, launch_arguments(HAS_BIAS=True), {})
    assert len(calls) == 5


def test_an_autotuner_is_keyed_on_its_kernel_and_the_config_the_analysis_compiles():
    analyse, calls = counting_analysis()
    kernel = JITFunction(python_function(decode.vnm_decode_kernel))

    def autotuned(block_n):  # torch traces a new autotuner at every launch, its configs pruned
        return triton.autotune(configs=[triton.Config({"BLOCK_N": block_n})], key=[])(kernel)

    analyse(autotuned(16), launch_arguments(), {})
    analyse(autotuned(16), launch_arguments(), {})
    assert len(calls) == 1
    analyse(autotuned(32), launch_arguments(), {})
    assert len(calls) == 2


def test_other_kernels_and_unknown_arguments_are_analysed_at_every_launch():
    analyse, calls = counting_analysis()
    other = JITFunction(not_a_vnm_kernel)
    x, y = fake_tensors(torch.float16, torch.float16)
    analyse(other, {"x_ptr": x, "y_ptr": y}, {})
    analyse(other, {"x_ptr": x, "y_ptr": y}, {})
    kernel = JITFunction(python_function(decode.vnm_decode_kernel))
    analyse(kernel, launch_arguments(R=[4096]), {})  # not a value the key knows how torch reads
    analyse(kernel, launch_arguments(R=[4096]), {})
    analyse(kernel, launch_arguments(), {"x_ptr": ("stable", ([16, 16],))})  # a TMA descriptor
    analyse(kernel, launch_arguments(), {"x_ptr": ("stable", ([16, 16],))})
    assert len(calls) == 6


def test_loading_the_kernels_memoizes_the_analysis_torch_has():
    from torch._higher_order_ops import triton_kernel_wrap

    import vnm_compile.kernels.dispatch  # noqa: F401  (what torch.compile loads to trace the kernels)

    present = [getattr(triton_kernel_wrap, name) for name in access_analysis._ANALYSES
               if hasattr(triton_kernel_wrap, name)]
    assert present and all(hasattr(analysis, "cached_answers") for analysis in present)
    access_analysis.memoize_access_analysis()  # a second call wraps nothing twice
    assert all(getattr(triton_kernel_wrap, analysis.__name__) is analysis for analysis in present)
