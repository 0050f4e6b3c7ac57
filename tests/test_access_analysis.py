"""torch's analysis of what a Triton launch reads and writes: vnm's kernels are analysed once per kernel
and arguments as the analysis sees them, every other kernel at every launch."""

import inspect

import pytest
import sympy
import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime.jit import JITFunction

import vnm_compile as vnm
from vnm_compile.kernels import access_analysis, decode, tuning
from vnm_compile.kernels.operands import Operands


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


class _CudaTarget:
    """The driver as torch's analysis uses it: the target it compiles the kernel's TTIR for."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def __getattr__(self, name):
        raise AttributeError(name)


@pytest.fixture
def cuda_target():
    driver = triton.runtime.driver
    previous = driver._active
    driver.set_active(_CudaTarget())
    yield
    driver._active = previous


def decode_launch(tokens):
    """The decode kernel and a launch's arguments as torch traces them (fake CUDA tensors, the first
    candidate config, the heuristic's EVEN_K), for `tokens` tokens."""
    weight = vnm.VNMWeight.from_dense(torch.randn(256, 512).half(), 64, 8)
    with FakeTensorMode():
        stored = [torch.empty(t.shape, dtype=t.dtype, device="cuda")
                  for t in (weight.values, weight.columns, weight.metadata)]
        x = torch.empty(4, 512, dtype=torch.float16, device="cuda")
        positional, constexprs = decode.decode_arguments(x, Operands(*stored, 64, 8, 512, None), 1,
                                                         decode.decode_output(x, 256, 1))
    kernel = JITFunction(python_function(decode.vnm_decode_kernel))
    config = tuning.config_record(tuning.candidates("decode", 256, 512, 4, 64, 64)[0])
    config = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    return kernel, {**dict(zip(kernel.arg_names, positional)), **constexprs, **config, "T": tokens, "EVEN_K": True}


def test_a_cached_answer_is_torchs_own_for_every_launch_it_stands_for(cuda_target):
    from torch._higher_order_ops import triton_kernel_wrap

    if not isinstance(decode.vnm_decode_kernel.fn, JITFunction):  # its helpers too: torch cannot compile it
        pytest.skip("the kernels were loaded for Triton's interpreter (TRITON_INTERPRET=1) in this process")

    name = next(name for name in reversed(access_analysis._ANALYSES) if hasattr(triton_kernel_wrap, name))
    torchs = getattr(triton_kernel_wrap, name)
    torchs = getattr(torchs, "__wrapped__", torchs)  # the analysis itself, if the kernels were loaded
    analyse = access_analysis._memoized(torchs)
    kernel, symbolic = decode_launch(sympy.Symbol("s0"))
    cached = analyse(kernel, symbolic, {})
    other_kernel, literal = decode_launch(2)  # the value torch analyses a symbol as
    assert analyse(kernel, literal, {}) == cached == torchs(other_kernel, literal, {})
    assert len(analyse.cached_answers) == 1
    writes = cached.read_writes.writes if hasattr(cached, "read_writes") else cached
    assert [getattr(write, "name", write) for write in writes] == ["y_ptr"]
