"""The Triton V:N:M kernels against float64, on CPU (Triton interpreter) and on CUDA.

Without CUDA the kernels run under TRITON_INTERPRET=1. Triton fixes a kernel's mode when the kernel
is defined, so this module sets the variable before the kernel modules are imported; vnm_compile
itself never imports them (they load on first use), and the `kernels` fixture reloads them if some
earlier import in this process defined them compiled. triton.language itself is imported before
the variable is set (vnm_compile's triton_op imports it), as in a full test run: its own
@triton.jit helpers then stay compiled, and the kernels must not call them.
"""

import importlib
import json
import os
import sys
import unittest.mock

import pytest
import torch
import triton.language  # noqa: F401  (see above)

import vnm_compile as vnm

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DEVICE = "cuda" if ON_GPU else "cpu"


KERNEL_MODULES = ("common", "decode", "prefill", "tuning", "dispatch")


@pytest.fixture(scope="module")
def kernels():
    """The kernel modules by name, defined in the mode this process needs (interpreted without CUDA)."""
    from triton.runtime.jit import JITFunction

    names = [f"vnm_compile.kernels.{name}" for name in KERNEL_MODULES]
    modules = [importlib.import_module(name) for name in names]
    if isinstance(modules[1].vnm_decode_kernel.fn, JITFunction) != ON_GPU:
        modules = [importlib.reload(sys.modules[name]) for name in names]
    return dict(zip(KERNEL_MODULES, modules))


def kernel_entry(kernels, x, weight, bias=None, dense_weight=None, layout=None, path=None):
    """The kernels' entry (`kernel_linear`) on x of any leading dims, as vnm.linear calls it on CUDA."""
    operands = vnm.kernels.operands(weight, bias, dense_weight, layout)
    y = kernels["dispatch"].kernel_linear(x.reshape(-1, weight.in_features), operands, path=path)
    return y.reshape(*x.shape[:-1], weight.out_features)


def relative_error(out, ref):
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - ref).norm() / ref.norm())


def make_case(rows, cols, v, m, tokens, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    # compressed where it runs: the mask search of a 4096 x 4096 weight takes seconds on a CPU
    weight = vnm.VNMWeight.from_dense(torch.randn(rows, cols, generator=gen).to(dtype).to(DEVICE), v, m)
    x = torch.randn(tokens, cols, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(rows, generator=gen).to(dtype).to(DEVICE)
    ref = x.double() @ weight.to_dense().double().T + bias.double()
    return weight, x, bias, ref


def run_path(kernels, path, weight, x, bias, kernel=None, channel_major=None, channel_major_out=False, **config):
    """One launch of `path` (autotuned unless `kernel` and its config are given) into a poisoned output,
    channel-major with `channel_major_out` (prefill only). The prefill kernel reads x as the
    dispatcher hands it over (transposed beyond ROW_MAJOR_MAX_TOKENS, in place below), unless
    `channel_major` says which; the decode kernels read x row-major unless `channel_major` is set."""
    decode, prefill, tuning = kernels["decode"], kernels["prefill"], kernels["tuning"]
    kernel = kernel or tuning.AUTOTUNED[path]
    poisoned = torch.full((x.shape[0], weight.out_features), float("nan"), dtype=x.dtype, device=x.device)
    if channel_major_out:
        poisoned = poisoned.t().contiguous().t()
    if path == "prefill":
        layout = vnm.kernels.prefill_layout(weight)
        if channel_major is None:
            channel_major = x.shape[0] > prefill.ROW_MAJOR_MAX_TOKENS
        xt = x.t().contiguous() if channel_major else x.t()
        y = prefill.launch_prefill(kernel, xt, layout.expanded, layout.channels,
                                   vnm.kernels.operands(weight, bias), out=poisoned, **config)
        assert y is poisoned
    else:  # a split decode stores its partial sums in a workspace of its own: poisoned as well
        split_k = 4 if path == "decode_split" else 1
        if channel_major:  # read in place (decode_input)
            x = x.t().contiguous().t()
        workspace = lambda x, rows, split_k: torch.full((split_k, x.shape[0], rows), float("nan"), device=x.device)
        with unittest.mock.patch.object(decode, "decode_output", workspace):
            y = decode.launch_decode(kernel, x, vnm.kernels.operands(weight, bias), split_k=split_k, out=poisoned,
                                     **config)
        assert (y is poisoned) == (split_k == 1)
    return y


# (rows, cols, v, m): dims that V and M do not divide, M = 4, 5, 6, 8, 16, odd and even G, V 16-64.
CPU_SHAPES = [(100, 77, 16, 5), (130, 200, 32, 16), (33, 12, 16, 4), (64, 64, 64, 8), (48, 45, 16, 6)]
CPU_PATHS = ("decode", "decode_split", "prefill")
CPU_CASES = [
    (shape, tokens, dtype, path)
    for i, (shape, dtype) in enumerate((s, d) for s in CPU_SHAPES
                                       for d in (torch.float16, torch.bfloat16, torch.float32))
    for tokens, path in [((1, 3, 17, 129)[i % 4], CPU_PATHS[i % 3]), ((3, 17, 1, 129)[i % 4], CPU_PATHS[(i + 1) % 3])]
]
interpreter_only = pytest.mark.skipif(ON_GPU, reason="interpreter runs are for machines without CUDA")


@interpreter_only
@pytest.mark.parametrize("shape,tokens,dtype,path", CPU_CASES,
                         ids=[f"{s[0]}x{s[1]}-{s[2]}:2:{s[3]}-t{t}-{str(d)[6:]}-{p}" for s, t, d, p in CPU_CASES])
def test_interpreted_kernel_matches_float64(kernels, shape, tokens, dtype, path):
    weight, x, bias, ref = make_case(*shape, tokens, dtype, seed=tokens + shape[0])
    assert relative_error(run_path(kernels, path, weight, x, bias), ref) < TOLERANCE[dtype]


@interpreter_only
@pytest.mark.parametrize("use_dot,select_x,prefetch,block_t,tokens", [
    (False, False, False, 1, 1), (False, False, True, 4, 3), (False, True, False, 1, 1), (False, True, True, 2, 5),
    (False, True, True, 4, 4), (True, False, False, 16, 17), (True, False, True, 16, 3)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("path,shape,block_j", [("decode", (70, 77, 16, 5), 16), ("decode_split", (64, 256, 32, 8), 4)])
def test_interpreted_decode_variants(kernels, use_dot, select_x, prefetch, block_t, tokens, dtype, path, shape,
                                     block_j):
    """The decode bodies (FMA selecting weights or picking activations by slot, tensor cores), with
    and without prefetch, token blocks smaller than the tokens; odd G (77 / 5), and an even split of
    several tiles a program (256 / 8: 16 group pairs, 4 splits of 4), where the prefetch of the last
    tile stays in bounds."""
    weight, x, bias, ref = make_case(*shape, tokens, dtype, seed=block_t)
    y = run_path(kernels, path, weight, x, bias, kernels["decode"].vnm_decode_kernel, BLOCK_N=16, BLOCK_T=block_t,
                 BLOCK_J=block_j, USE_DOT=use_dot, SELECT_X=select_x, PREFETCH=prefetch)
    assert relative_error(y, ref) < TOLERANCE[dtype]


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("path,use_dot,select_x,block_t,tokens", [
    ("decode", False, False, 4, 3), ("decode", False, True, 4, 4), ("decode", True, False, 16, 17),
    ("decode_split", True, False, 16, 16), ("decode_split", False, False, 2, 5)])
def test_interpreted_decode_reads_channel_major_x(kernels, path, use_dot, select_x, block_t, tokens, dtype):
    """Each decode body reads a channel-major x (a channel's tokens side by side) in place, with odd
    G and dims that V and M do not divide."""
    weight, x, bias, ref = make_case(70, 77, 16, 5, tokens, dtype, seed=tokens)
    y = run_path(kernels, path, weight, x, bias, kernels["decode"].vnm_decode_kernel, channel_major=True,
                 BLOCK_N=16, BLOCK_T=block_t, BLOCK_J=4, USE_DOT=use_dot, SELECT_X=select_x, PREFETCH=True)
    assert relative_error(y, ref) < TOLERANCE[dtype]


@interpreter_only
@pytest.mark.parametrize("w_left", [True, False])
@pytest.mark.parametrize("channel_major", [True, False])
@pytest.mark.parametrize("channel_major_out", [False, True])
def test_interpreted_prefill_orientations(kernels, w_left, channel_major, channel_major_out):
    """Weight or tokens on the MMA's M side; x transposed or read in place (row-major); y written
    row-major or channel-major (for a consumer that reads it so)."""
    weight, x, bias, ref = make_case(90, 100, 32, 8, 20, torch.float16, seed=7)
    y = run_path(kernels, "prefill", weight, x, bias, kernels["prefill"].vnm_prefill_kernel,
                 channel_major=channel_major, channel_major_out=channel_major_out, BLOCK_N=32, BLOCK_T=16,
                 BLOCK_K=32, W_LEFT=w_left, GROUP_N=2)
    assert relative_error(y, ref) < TOLERANCE[torch.float16]


def test_transpose_is_exact(kernels):
    x = torch.randn(37, 70, device=DEVICE).half()
    xt = torch.empty(70, 37, device=DEVICE).half()
    kernels["prefill"].transpose_kernel[(3, 5)](x, xt, 37, 70, BLOCK_T=16, BLOCK_C=16)
    assert torch.equal(xt, x.t())


def test_kernel_entry_dispatches(kernels):
    weight, x, bias, ref = make_case(40, 24, 16, 8, 6, torch.float32, seed=1)
    y = kernel_entry(kernels, x.view(2, 3, 24), weight, bias)
    assert y.shape == (2, 3, 40)
    assert relative_error(y.reshape(6, 40), ref) < TOLERANCE[torch.float32]
    layout = vnm.kernels.prefill_layout(weight)
    assert relative_error(kernel_entry(kernels, x, weight, bias, layout=layout, path="prefill"), ref) < 1e-5
    y = kernel_entry(kernels, x, weight, bias, dense_weight=weight.to_dense(), path="dense")
    assert relative_error(y, ref) < TOLERANCE[torch.float32]
    assert kernel_entry(kernels, x[:0], weight, bias).shape == (0, 40)
    with pytest.raises(ValueError, match="^dense_weight"):
        vnm.vnm_linear(x, weight, bias, dense_weight=torch.zeros(3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="^path"):
        kernel_entry(kernels, x, weight, bias, path="sparse")


@pytest.mark.parametrize("tokens,path", [(40, "prefill"), (20, "prefill"), (3, "decode"), (1, "decode")])
def test_entry_reads_channel_major_x(kernels, monkeypatch, tokens, path):
    """x written channel-major by its producer (passes/layout.py): the prefill path reads it in place,
    with no transpose; the decode path, which reads x row-major, copies it."""
    weight, x, bias, ref = make_case(40, 100, 16, 8, tokens, torch.float16, seed=tokens)
    channel_major = x.t().contiguous().t()
    assert channel_major.t().is_contiguous() and torch.equal(channel_major, x)

    class NoTranspose:
        def __getitem__(self, grid):
            raise AssertionError("a channel-major x was transposed again")

    monkeypatch.setattr(kernels["dispatch"], "transpose_kernel", NoTranspose())
    y = kernel_entry(kernels, channel_major, weight, bias, layout=vnm.kernels.prefill_layout(weight), path=path)
    assert relative_error(y, ref) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("tokens", [0, 1, 3, 17, 129])
@pytest.mark.parametrize("path", ["prefill", "decode", "dense"])
def test_entry_writes_channel_major_on_request(kernels, tokens, path):
    """channel_major_out: the prefill kernel writes y.T, the other paths copy; the same values."""
    weight, x, bias, ref = make_case(70, 45, 16, 6, tokens, torch.float32, seed=tokens + 1)
    operands = vnm.kernels.operands(weight, bias, weight.to_dense())
    y = kernels["dispatch"].kernel_linear(x, operands, path=path, channel_major_out=True)
    assert y.shape == (tokens, 70) and y.t().is_contiguous()
    if tokens:
        assert relative_error(y, ref) < TOLERANCE[torch.float32]


def test_dispatch_rules(kernels):
    choose = kernels["dispatch"].choose_path
    cpu = torch.device("cpu")  # no table: the default rules
    assert choose(4096, 4096, 1, 64, 8, torch.float16, cpu, has_dense=True) == "decode"
    assert choose(4096, 4096, 4096, 64, 8, torch.float16, cpu, has_dense=False) == "prefill"
    assert choose(4096, 4096, 4096, 64, 4, torch.float16, cpu, has_dense=True) == "dense"
    assert choose(4096, 4096, 4096, 64, 4, torch.float16, cpu, has_dense=False) == "prefill"
    # a kept cuSPARSELt copy: on many tokens at M <= 8, never for decode, and not at M = 16
    assert choose(4096, 4096, 4096, 64, 8, torch.float16, cpu, has_dense=False, has_cslt=True) == "cusparselt"
    assert choose(4096, 4096, 4, 64, 8, torch.float16, cpu, has_dense=False, has_cslt=True) == "decode"
    assert choose(4096, 4096, 4096, 64, 16, torch.float16, cpu, has_dense=False, has_cslt=True) == "prefill"


def test_dispatch_keeps_dense_unless_sparse_measured_clearly_faster(kernels, monkeypatch):
    dispatch, tuning = kernels["dispatch"], kernels["tuning"]
    key = tuning.table_key(4096, 4096, kernels["common"].token_bucket(4), 64, 8, torch.float16)
    entries = {"dispatch": {key: {"path": "decode_split", "sparse_us": 10.0, "dense_us": 10.3}}, "rules": {}}
    monkeypatch.setattr(dispatch, "load_table", lambda slug: entries)
    choose = lambda has_dense: dispatch.choose_path(4096, 4096, 4, 64, 8, torch.float16, torch.device("cpu"), has_dense)
    assert choose(has_dense=True) == "dense" and choose(has_dense=False) == "decode_split"
    entries["dispatch"][key]["dense_us"] = 10.0 * dispatch.SPARSE_MARGIN * 1.01
    assert choose(has_dense=True) == "decode_split"
    entries["dispatch"][key]["cslt_us"] = 9.0  # measured faster by the margin: taken where the copy is kept
    cslt = dispatch.choose_path(4096, 4096, 4, 64, 8, torch.float16, torch.device("cpu"), False, has_cslt=True)
    assert cslt == "cusparselt" and choose(has_dense=False) == "decode_split"


def test_dispatch_takes_the_sparse_tensor_core_kernel_where_its_layout_is_kept_and_measured_faster(kernels,
                                                                                                     monkeypatch):
    dispatch, tuning = kernels["dispatch"], kernels["tuning"]
    key = tuning.table_key(4096, 4096, 16, 64, 8, torch.float16)
    entries = {"dispatch": {key: {"path": "decode_split", "sparse_us": 13.0, "dense_us": 17.0}}, "rules": {}}
    monkeypatch.setattr(dispatch, "load_table", lambda slug: entries)
    cpu = torch.device("cpu")
    choose = lambda has_dense=False, has_mma=True: dispatch.choose_path(4096, 4096, 16, 64, 8, torch.float16, cpu,
                                                                        has_dense, has_mma=has_mma)
    pays = lambda: dispatch.sparse_mma_pays(4096, 4096, 64, 8, torch.float16, cpu, False, False)
    assert choose() == "decode_split" and not pays()  # not measured: never taken, its layout not worth keeping
    entries["dispatch"][key].update(mma_us=7.0, mma_config="rows128_tokens16_split4")
    assert choose() == "sparse_mma" and choose(has_mma=False) == "decode_split" and pays()
    assert dispatch.mma_config(4096, 4096, 9, 64, 8, torch.float16, cpu) == "rows128_tokens16_split4"  # its bucket
    assert dispatch.choose_path(4096, 4096, 1, 64, 8, torch.float16, cpu, False, has_mma=True) == "decode"
    entries["dispatch"][key]["dense_us"] = 7.0  # a kept dense weight still wins where cuBLAS is as fast
    assert choose(has_dense=True) == "dense"
    entries["dispatch"][key]["mma_us"] = 12.9  # within the margin of the Triton path: that stays
    assert choose() == "decode_split" and not pays()


def test_plans_live_as_long_as_their_weight(kernels):
    """The dynamic graph's entry keeps one plan table per weight, reused by later calls and dropped
    with the weight (the dense path runs on the CPU: no kernel launch)."""
    import gc

    dispatch = kernels["dispatch"]
    weight = vnm.VNMWeight.from_dense(torch.randn(40, 30), 16, 4)
    dense = weight.to_dense()
    for tokens in (1, 3, 17, 3):
        x = torch.randn(tokens, 30)
        y = dispatch.planned_linear(x, weight.values, weight.columns, weight.metadata, None, weight.v, weight.m,
                                    weight.in_features, dense, None, None, None, None, None, None, False)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, dense))
    assert len(dispatch._PLANS[id(weight.values)]) == 3  # buckets 1, 4 and 32
    key = id(weight.values)
    del weight
    gc.collect()
    assert key not in dispatch._PLANS


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_relaunches_pass_each_calls_operands(kernels, monkeypatch, path, with_bias):
    """A plan relaunches its first call's binary with this call's addresses for what a call may bring
    anew: the bias, and the prefill layout (built for the call where the operands lack one). The
    kernel is replaced by a recorder: the relaunch path runs on the CPU without a GPU binary."""
    from vnm_compile.kernels.launcher import jit_function

    dispatch, tuning = kernels["dispatch"], kernels["tuning"]
    launches = []

    class Binary:
        function = packed_metadata = None

        def run(self, *arguments):  # grid, stream, function, metadata, launch metadata, hooks, then the arguments
            launches.append(arguments[9:])

    def first_launch(*arguments, grid, warmup, **constexprs):
        launches.append(arguments)
        return Binary()

    kernel = tuning.AUTOTUNED[path]
    monkeypatch.setattr(kernel, "run", first_launch)
    monkeypatch.setattr(kernel, "best_config", tuning.INTERPRETER_CONFIGS[path], raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, raising=False)
    names = jit_function(kernel).arg_names
    address = lambda value: value.data_ptr() if isinstance(value, torch.Tensor) else value
    weight = vnm.VNMWeight.from_dense(torch.randn(64, 96), 16, 8)
    plan, kept = dispatch._Plan(path), []
    for _ in range(2):  # the first call launches through the kernel, the second relaunches its binary
        layout, bias = vnm.kernels.prefill_layout(weight), torch.randn(64) if with_bias else None
        kept.append((layout, bias))  # alive, so that no address is reused
        flat = (weight.values, weight.columns, weight.metadata, weight.v, weight.m, weight.in_features, bias, None,
                layout.expanded, layout.channels, None)
        plan(torch.randn(24, 96), flat, False)
        passed = {name: address(value) for name, value in zip(names, launches[-1])}
        if with_bias:
            assert passed["bias_ptr"] == bias.data_ptr()
        if path == "prefill":
            assert (passed["w_ptr"], passed["channel_ptr"]) == (layout.expanded.data_ptr(), layout.channels.data_ptr())
    assert len(launches) == 2 and len(plan.binaries) == 1


def test_shipped_tables_are_consistent(kernels):
    """Every shipped table entry names a known path and a config among the candidates (the sparse
    tensor-core kernel's too)."""
    from vnm_compile.kernels.sparse_mma import CONFIGS

    tuning = kernels["tuning"]
    configs = {"prefill": tuning.PREFILL_CONFIGS, "decode": tuning.DECODE_CONFIGS,
               "decode_split": tuning.DECODE_CONFIGS}
    for path in tuning.TABLES.glob("*.json"):
        table = json.loads(path.read_text())
        for key, record in table.get("autotune", {}).items():
            kernel_path, _, _, pattern, _ = key.split(" ")
            assert any(tuning._same(c, record) for c in configs[kernel_path]), (path.name, key)
            assert record["BLOCK_N"] <= int(pattern.split(":")[0]), (path.name, key)  # a tile in one row block
        for key, entry in table.get("dispatch", {}).items():
            assert entry["path"] in kernels["dispatch"].PATHS and entry["path"] != "dense", (path.name, key)
            assert entry["sparse_us"] > 0 and entry["dense_us"] > 0
            if "mma_us" in entry:  # the sparse tensor-core kernel's time, with a config it still has
                assert entry["mma_us"] > 0 and entry["mma_config"] in CONFIGS, (path.name, key)


def test_pruning_keeps_the_recorded_config_else_the_candidates_that_fit(kernels, monkeypatch):
    """What Triton (or Inductor, tracing) times for a launch: a key in the table keeps its recorded
    config alone; another keeps the candidates that fit its shape, in order; VNM_AUTOTUNE=0 the first."""
    tuning = kernels["tuning"]
    recorded = next(c for c in tuning.candidates("decode", 4096, 4096, 1, 512, 64)
                    if c.kwargs["SELECT_X"] and c.kwargs["BLOCK_N"] == 8)
    key = "decode " + tuning.table_key(4096, 4096, 1, 64, 8, torch.float16)
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "gpu_slug", lambda device: "some-gpu")
    monkeypatch.setattr(tuning, "load_table", lambda slug: {"autotune": {key: tuning.config_record(recorded)}})
    prune = tuning._prune("decode")
    x = torch.empty(1, 4096, dtype=torch.float16)
    named = lambda tokens: {"x_ptr": x, "R": 4096, "C": 4096, "T": tokens, "G": 512, "M": 8,
                            "TOKEN_BUCKET": triton.next_power_of_2(tokens)}
    configs = list(tuning.DECODE_CONFIGS)
    assert prune(configs, named(1), V=64) == [recorded]
    fitting = tuning.candidates("decode", 4096, 4096, 8, 512, 64)
    assert 1 < len(fitting) < len(configs)
    assert prune(configs, named(8), V=64) == fitting  # not recorded: every fitting candidate
    monkeypatch.setenv("VNM_AUTOTUNE", "0")
    assert prune(configs, named(8), V=64) == fitting[:1]


def test_compiles_without_graph_breaks():
    """The op traces into the graph (CPU: the reference body) with fullgraph=True."""
    weight = vnm.VNMWeight.from_dense(torch.randn(48, 40), 16, 8)
    x = torch.randn(5, 40)

    def f(x):
        return torch.relu(vnm.vnm_linear(x, weight)) + 1

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(f)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


# ------------------------------------------------------------------------------------------ GPU
@pytest.fixture
def untuned(monkeypatch):
    """Shapes outside the shipped tables run their first fitting config instead of being timed."""
    monkeypatch.setenv("VNM_AUTOTUNE", "0")


GPU_PATTERNS = [(64, 4), (64, 5), (64, 6), (64, 8), (64, 16), (128, 8), (32, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("v,m", GPU_PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_dispatch_real_sizes(kernels, untuned, v, m, dtype):
    for (rows, cols), tokens in [((4096, 4096), 1), ((768, 3072), 16), ((3072, 768), 129), ((4096, 4096), 2048)]:
        weight, x, bias, ref = make_case(rows, cols, v, m, tokens, dtype, seed=tokens)
        y = kernel_entry(kernels, x, weight, bias)
        assert relative_error(y, ref) < TOLERANCE[dtype], (rows, cols, tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["decode", "decode_split", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_paths_awkward_shapes(kernels, untuned, path, dtype):
    for rows, cols, v, m, tokens in [(1000, 777, 64, 5, 1), (333, 1200, 32, 16, 17), (4100, 4099, 64, 8, 129),
                                     (700, 650, 128, 6, 3)]:
        weight, x, bias, ref = make_case(rows, cols, v, m, tokens, dtype, seed=rows)
        assert relative_error(run_path(kernels, path, weight, x, bias), ref) < TOLERANCE[dtype], (rows, cols, tokens)


@pytest.mark.gpu
def test_gpu_split_decode_gives_the_same_bits_on_every_run(kernels, untuned):
    """Split-K adds its partial sums in a fixed order (no atomics): repeated runs agree bit for bit,
    on a shape with many programs per output tile."""
    weight, x, bias, ref = make_case(4096, 11008, 64, 8, 16, torch.float16, seed=7)
    runs = [run_path(kernels, "decode_split", weight, x, bias) for _ in range(5)]
    assert relative_error(runs[0], ref) < TOLERANCE[torch.float16]
    assert all(torch.equal(run, runs[0]) for run in runs[1:])


@pytest.mark.gpu
@pytest.mark.parametrize("path,block_n,block_t,block_j,use_dot,select_x,prefetch", [
    ("decode", 16, 1, 32, False, False, False), ("decode", 16, 1, 32, False, True, False),
    ("decode", 16, 1, 256, False, True, False), ("decode", 16, 1, 64, False, True, True),
    ("decode", 16, 4, 32, False, False, True), ("decode", 16, 2, 32, False, True, True),
    ("decode", 16, 4, 64, False, True, False), ("decode", 16, 16, 32, True, False, False),
    ("decode_split", 16, 2, 32, False, False, False), ("decode_split", 16, 1, 32, False, True, True),
    ("decode_split", 64, 16, 32, True, False, True), ("decode", 32, 16, 16, True, False, True)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_variants(kernels, path, block_n, block_t, block_j, use_dot, select_x, prefetch, dtype):
    """The decode bodies on real sizes, the byte-permute pick (select_x) in both 16-bit dtypes, the
    tensor-core body with 64-row tiles (wgmma) and 32-row tiles."""
    decode = kernels["decode"]
    for rows, cols, v, m, tokens in [(4096, 4096, 64, 8, block_t), (11008, 4096, 64, 16, 1), (768, 3077, 32, 6, 2),
                                     (4096, 4100, 64, 5, 13)]:
        if block_n > v:
            continue
        weight, x, bias, ref = make_case(rows, cols, v, m, tokens, dtype, seed=cols)
        y = run_path(kernels, path, weight, x, bias, decode.vnm_decode_kernel, BLOCK_N=block_n, BLOCK_T=block_t,
                     BLOCK_J=block_j, USE_DOT=use_dot, SELECT_X=select_x, PREFETCH=prefetch)
        assert relative_error(y, ref) < TOLERANCE[dtype], (rows, cols, tokens)


class SparseLinear(torch.nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.v, self.m, self.in_features = weight.v, weight.m, weight.in_features
        for name, tensor in (("values", weight.values), ("columns", weight.columns), ("metadata", weight.metadata)):
            self.register_buffer(name, tensor)
        self.register_buffer("bias", bias)

    def forward(self, x):
        y = torch.ops.vnm.linear(x, self.values, self.columns, self.metadata, self.bias, self.v, self.m,
                                 self.in_features)
        return torch.nn.functional.gelu(y)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [4, 256])
def test_gpu_inductor_emits_the_kernel(kernels, untuned, tokens):
    from torch._inductor.utils import run_and_get_code

    weight, x, bias, _ = make_case(1024, 512, 64, 8, tokens, torch.float16, seed=tokens)
    module = SparseLinear(weight, bias)
    ref = torch.nn.functional.gelu(x.double() @ weight.to_dense().double().T + bias.double())
    torch._dynamo.reset()
    assert torch._dynamo.explain(module)(x).graph_break_count == 0
    compiled = torch.compile(module, fullgraph=True)
    y, code = run_and_get_code(compiled, x)
    assert ("vnm_decode_kernel" if tokens <= 16 else "vnm_prefill_kernel") in "\n".join(code)
    assert relative_error(y, ref) < TOLERANCE[torch.float16]


@pytest.mark.gpu
def test_gpu_dynamic_token_count_dispatches_per_call(kernels):
    """With a symbolic token count the op defers to vnm.linear_dispatched: one graph serves every
    token count, each call picks its kernel and config from its real size, and the results stay right."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    weight, _, bias, _ = make_case(1024, 512, 64, 8, 1, torch.float16, seed=3)
    module = SparseLinear(weight, bias)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(module, dynamic=True, fullgraph=True)
    for index, tokens in enumerate((3, 17, 300, 2048, 5)):  # not 1: torch specialises sizes 0 and 1
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.float16)
        ref = torch.nn.functional.gelu(x.double() @ weight.to_dense().double().T + bias.double())
        if index == 0:
            y, code = run_and_get_code(compiled, x)
            assert "vnm.linear_dispatched" in "\n".join(code)
        else:
            y = compiled(x)
        assert relative_error(y, ref) < TOLERANCE[torch.float16], tokens
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("v,m,rows,cols", [(64, 8, 1000, 777), (32, 16, 4096, 4100), (64, 5, 384, 4096)])
def test_gpu_planned_calls_match_float64(kernels, untuned, v, m, rows, cols, dtype):
    """vnm.linear_dispatched on CUDA relaunches the binaries of its first call per weight and token
    bucket: token counts inside one bucket that Triton specialises differently (1, divisible by 16 or
    not), x that is misaligned or channel-major, with and without bias and layouts, all stay right."""
    gen = torch.Generator().manual_seed(rows)
    weight = vnm.VNMWeight.from_dense(torch.randn(rows, cols, generator=gen).to(dtype), v, m).to("cuda")
    bias = torch.randn(rows, generator=gen).to(dtype).cuda()
    layout = vnm.kernels.prefill_layout(weight)
    for tokens in (1, 2, 3, 16, 17, 31, 32, 33, 48, 129, 128, 2047, 2048):
        for with_bias, with_layout, kind in ((True, True, "row"), (False, False, "row"), (True, True, "misaligned"),
                                             (True, True, "channel-major")):
            base = torch.randn(tokens * cols + 1, generator=gen).to(dtype).cuda()
            x = base[1:] if kind == "misaligned" else base[:-1]
            x = x.view(tokens, cols)
            if kind == "channel-major":
                x = x.t().contiguous().t()
            b = bias if with_bias else None
            operands = vnm.kernels.operands(weight, b, layout=layout if with_layout else None)
            for _ in range(2):  # the first call makes the binary, the second relaunches it
                y = torch.ops.vnm.linear_dispatched(x, *operands.op_arguments(), False)
                ref = x.double() @ weight.to_dense().double().T + (b.double() if with_bias else 0)
                assert relative_error(y, ref) < TOLERANCE[dtype], (tokens, with_bias, with_layout, kind)


def test_cusparselt_refuses_weights_it_cannot_take_naming_why():
    from vnm_compile.kernels import cusparselt_refusal, cusparselt_weight

    dense = torch.randn(96, 160).half()
    assert "multiple of 4" in cusparselt_refusal(vnm.VNMWeight.from_dense(dense, 32, 10))
    assert "96 x 120" in cusparselt_refusal(vnm.VNMWeight.from_dense(dense[:, :120], 32, 8))
    assert "CUDA" in cusparselt_refusal(vnm.VNMWeight.from_dense(dense, 32, 8))
    with pytest.raises(ValueError, match="multiple of 4"):
        cusparselt_weight(vnm.VNMWeight.from_dense(dense, 32, 10))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("v,m,rows,cols", [(64, 8, 1024, 4096), (64, 4, 768, 1536), (128, 8, 4096, 1024)])
def test_gpu_cusparselt_path_matches_float64(kernels, v, m, rows, cols, dtype):
    """A V:N:M weight at M % 4 == 0 runs on cuSPARSELt over its full width, eagerly and per call."""
    for tokens in (17, 129, 2048):
        weight, x, bias, ref = make_case(rows, cols, v, m, tokens, dtype, seed=tokens)
        cslt = vnm.kernels.cusparselt_weight(weight)
        operands = vnm.kernels.operands(weight, bias, cslt=cslt)
        y = kernels["dispatch"].kernel_linear(x, operands, path="cusparselt")
        assert y.shape == (tokens, rows) and y.is_contiguous()
        assert relative_error(y, ref) < TOLERANCE[dtype], tokens
        y = torch.ops.vnm.linear_dispatched(x, *operands.op_arguments(), False)  # dispatcher's choice, per call
        assert relative_error(y, ref) < TOLERANCE[dtype], tokens
