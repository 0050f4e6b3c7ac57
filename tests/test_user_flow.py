"""The ordinary torch.compile flow: one compile, then whatever token counts come; bad weights and
silent inputs are named; on a GPU, CUDA graphs replay and generate() matches eager."""

import contextlib
import importlib
import logging
import math

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import vnm_compile as vnm
import vnm_compile.config as vnm_config

OPTIONS = {"v": 16, "m": 8, "min_features": 16, "allow_small_v": True}


class _Block(nn.Module):
    def __init__(self, dim=48, hidden=80):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def _reference(model, x):
    """The compiled model's function in float64: every sparse linear by its masked weight."""
    layers = {layer.name: layer for layer in vnm.reports()[-1].sparse_layers}
    with torch.no_grad():
        h = x.double()
        normed = torch.nn.functional.layer_norm(h, (48,), model.norm.weight.double(), model.norm.bias.double())
        up = normed @ layers["up"].masked_weight().double().T + model.up.bias.double()
        return h + torch.nn.functional.gelu(up) @ layers["down"].masked_weight().double().T + model.down.bias.double()


def test_one_dynamic_graph_serves_every_token_count():
    """After a second shape, Dynamo recompiles once with a symbolic token count; every later count runs in
    that graph (torch specialises a count of 1 on its own) through vnm.linear_dispatched."""
    torch.manual_seed(0)
    model = _Block().eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="vnm", options=OPTIONS)
    with torch.no_grad():
        for tokens in (129, 3, 17, 5, 1, 64):
            x = torch.randn(2, tokens, 48)
            y = compiled(x)
            error = (y.double() - _reference(model, x)).norm() / _reference(model, x).norm()
            assert error < 1e-5, tokens
    assert counters["stats"]["unique_graphs"] == 3  # the first static graph, the dynamic one, one token


def test_small_token_counts_run_graphs_per_bucket(monkeypatch, caplog):
    """Token counts up to small_tokens run in a graph compiled per bucket of counts (2, 3-4, ...): as
    Inductor traces it, its sparse linears see a symbolic count whose range is the bucket's, and plan
    for its largest value (so on CUDA the kernels are launched directly), where the dynamic graph's
    plan for many tokens; all match float64, a bucket's graph serves each count in it, and Dynamo makes
    no extra graph. The CPU stands in for CUDA here: there every graph runs the reference."""
    from vnm_compile import backend
    from vnm_compile.kernels import op
    from vnm_compile.kernels.common import MANY_TOKENS, planned_count

    monkeypatch.setattr(vnm_config, "SMALL_TOKEN_GRAPH_DEVICES", ("cuda", "cpu"))
    traced = []  # per compile: (static count or None, count planned for) of each vnm.linear Inductor traced
    plans = []  # per compile: the plan_symbolic its vnm.linear nodes carry
    lowering = []

    def traced_path(x, *args):
        if lowering:
            sizes = x.shape[:-1]
            traced[-1].add((op.static_count(sizes), math.prod(planned_count(size) for size in sizes)))
        return real_traced_path(x, *args)

    def lower(state, example_inputs, record=False):
        traced.append(set())
        plans.append({node.kwargs.get("plan_symbolic") for node in state.graph.graph.nodes
                      if node.target is torch.ops.vnm.linear.default})
        lowering.append(True)
        try:
            return real_lower(state, example_inputs, record)
        finally:
            lowering.pop()

    real_traced_path, real_lower = op.traced_path, backend.lower
    monkeypatch.setattr(op, "traced_path", traced_path)
    monkeypatch.setattr(backend, "lower", lower)
    torch.manual_seed(0)
    model = _Block().eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="vnm", options={**OPTIONS, "small_tokens": 4})
    many = 2 * MANY_TOKENS  # x is [2, tokens, 48]: the batch stays static
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False), caplog.at_level(logging.WARNING):
        for tokens, compiles in ((129, [{(258, 258)}]), (3, [{(None, many)}, {(None, 8)}]), (17, []),
                                 (2, [{(None, 4)}]), (4, []), (3, []), (9, [])):
            traced.clear()
            x = torch.randn(2, tokens, 48)
            error = (compiled(x).double() - _reference(model, x)).norm() / _reference(model, x).norm()
            assert error < 1e-5, tokens
            assert traced == compiles, tokens
    assert counters["stats"]["unique_graphs"] == 2  # the first static graph and the dynamic one
    assert not [r.getMessage() for r in caplog.records if "no graph for token ranges" in r.getMessage()]
    assert plans[1] == {True}  # the dynamic graph's kernels are planned for the counts it serves
    traced.clear()
    plans.clear()
    torch._dynamo.reset()
    replayed = torch.compile(model, backend="vnm", options={**OPTIONS, "small_tokens": 4, "mode": "reduce-overhead"})
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        for tokens in (129, 3, 2):
            replayed(torch.randn(2, tokens, 48))
    assert traced == [{(258, 258)}, {(None, many)}]  # CUDA graph replays skip the dispatch: no bucket graphs
    assert plans[1] == {None}  # ... so the dynamic graph serves every count, choosing per call


@pytest.mark.slow
def test_bucket_graphs_of_a_llama_give_the_dynamic_graphs_bits(monkeypatch, caplog):
    """A Llama's decode batches of 2 to 16 (and a few tokens each) run in bucket graphs compiled for
    other counts of their bucket (attention, rotary positions and all): each gives the bits of the
    dynamic graph that serves every count. The CPU stands in for CUDA (both run the reference)."""
    from conftest import tiny_config

    from vnm_compile import backend

    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(vnm_config, "SMALL_TOKEN_GRAPH_DEVICES", ("cuda", "cpu"))
    compiles = []  # the ranges of each bucket graph compiled
    real_bounded = backend.bounded
    monkeypatch.setattr(backend, "bounded", lambda context, ranges: compiles.append(tuple(ranges.values()))
                        or real_bounded(context, ranges))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama")).eval()
    calls = ((1, 24), (3, 1), (4, 1), (2, 1), (7, 1), (5, 1), (16, 1), (9, 1), (6, 3), (8, 4))
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, model.config.vocab_size, call, generator=generator) for call in calls]
    logits = {}
    for small_tokens in (16, 0):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="vnm", options={**OPTIONS, "skip": ["lm_head"],
                                                               "small_tokens": small_tokens})
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="vnm_compile"):
            logits[small_tokens] = [compiled(input_ids=i, use_cache=False).logits for i in ids]
    assert not [r.getMessage() for r in caplog.records if "no graph for token ranges" in r.getMessage()]
    assert ((9, 16),) in compiles and len(compiles) < len(calls) - 2  # 4, 5 and 9 ran graphs compiled for 3, 7, 16
    for call, bucketed, dynamic in zip(calls, logits[16], logits[0]):
        assert torch.equal(bucketed, dynamic), call


def test_a_bucket_graph_that_fails_to_compile_leaves_the_dynamic_graph(monkeypatch, caplog):
    from vnm_compile import backend

    monkeypatch.setattr(vnm_config, "SMALL_TOKEN_GRAPH_DEVICES", ("cuda", "cpu"))

    def refuse(*args, **kwargs):
        raise RuntimeError("no bucket graph today")

    monkeypatch.setattr(backend, "bounded", refuse)
    torch.manual_seed(0)
    model = _Block().eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vnm", options={**OPTIONS, "small_tokens": 4})
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="vnm_compile"):
        for tokens in (129, 3, 4):
            x = torch.randn(2, tokens, 48)
            error = (compiled(x).double() - _reference(model, x)).norm() / _reference(model, x).norm()
            assert error < 1e-5, tokens
    failures = [r for r in caplog.records if "no graph for token ranges ((3, 4),)" in r.getMessage()]
    assert len(failures) == 1 and "no bucket graph today" in failures[0].getMessage()


def test_a_bucket_compile_may_assume_only_what_its_whole_range_holds():
    """A guard added while a bucket's graph compiles is checked by nothing at run time (Dynamo froze the
    shape environment when it built its guards): the compile fails unless it holds for every size of
    the range, and no guard, axiom, range or replacement outlives it."""
    from torch._guards import TracingContext

    from vnm_compile import backend

    shape_env, mode, symbol, tokens = _symbolic_tokens(12)
    shape_env.freeze()  # as Dynamo leaves it
    for condition, kept in ((lambda t: t % 2 == 0, False), (lambda t: t > 10, False), (lambda t: t * t % 4 != 2, True)):
        compile_bucket = backend.bounded(TracingContext(mode), {symbol: (9, 16)})
        with contextlib.nullcontext() if kept else pytest.raises(RuntimeError, match="not every size in"):
            with compile_bucket:
                assert condition(tokens)  # the hint (12) meets it: a guard is added
                assert shape_env.guards
        assert not shape_env.guards and not shape_env.replacements and not shape_env.axioms
        assert shape_env.bound_sympy(symbol).upper > 16


@pytest.mark.parametrize("limit,ranges", [(16, {1: (1, 1), 2: (2, 2), 3: (3, 4), 4: (3, 4), 5: (5, 8), 8: (5, 8),
                                                9: (9, 16), 16: (9, 16)}),
                                          (12, {9: (9, 12), 12: (9, 12)})])
def test_token_ranges_are_the_power_of_two_buckets_up_to_the_limit(limit, ranges):
    from vnm_compile.backend import token_range

    assert {size: token_range(size, limit) for size in ranges} == ranges


def _symbolic_tokens(hint: int):
    """A fake mode whose shape environment holds a dynamic token count: (shape_env, mode, symbol, tokens)."""
    from torch._dynamo.source import LocalSource, TensorProperty, TensorPropertySource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    shape_env = ShapeEnv()
    source = TensorPropertySource(LocalSource("x"), TensorProperty.SIZE, 0)
    symbol = shape_env.create_symbol(hint, source=source, dynamic_dim=DimDynamic.DYNAMIC)
    return shape_env, FakeTensorMode(shape_env=shape_env), symbol, shape_env.create_symintnode(symbol, hint=hint,
                                                                                               source=source)


def test_bounded_token_count_takes_the_kernel_path_planned_for_its_largest(monkeypatch):
    """Traced for CUDA (fake tensors: no GPU needed), vnm.linear with a symbolic token count defers to
    the per-call op; asked to plan for it (plan_symbolic), it takes the kernel path with the count
    planned for the largest value in the symbol's range, as the backend's bucket graphs are compiled,
    range after range (nothing of one range is served to another), and many tokens where unbounded;
    never adding a guard on the count."""
    from torch._guards import TracingContext

    from vnm_compile import backend
    from vnm_compile.kernels import dispatch
    from vnm_compile.kernels.common import MANY_TOKENS, planned_count

    monkeypatch.setattr(dispatch, "gpu_slug", lambda device: "no-such-gpu")  # no GPU: the default rules
    planned = []  # the count planned for at each call that reached the kernel entry (stubbed: nothing launches)
    monkeypatch.setattr(dispatch, "kernel_linear", lambda x, operands, *args, **kwargs: planned.append(planned_count(
        x.shape[0])) or x.new_empty(x.shape[0], operands.rows))
    weight = vnm.VNMWeight.from_dense(torch.randn(256, 512).half(), 64, 8)
    shape_env, mode, symbol, tokens = _symbolic_tokens(5)
    with mode:
        stored = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in (weight.values, weight.columns,
                                                                               weight.metadata)]
    for bucket, plan_symbolic, expected in ((None, False, []), ((3, 4), True, [4]), ((5, 8), True, [8]),
                                            ((3, 4), True, [4]), (None, True, [MANY_TOKENS])):
        planned.clear()
        context = backend.bounded(TracingContext(mode), {symbol: bucket}) if bucket else contextlib.nullcontext()
        with context, mode:
            x = torch.empty(tokens, 1, 512, device="cuda", dtype=torch.float16)  # fresh, as AOT fakes its inputs
            y = torch.ops.vnm.linear(x, *stored, None, 64, 8, 512, plan_symbolic=plan_symbolic)
            assert y.shape[1:] == (1, 256) and y.shape[0] == tokens
        assert planned == expected, bucket
    assert not shape_env.guards and shape_env.bound_sympy(symbol).upper > 8  # the range restored


@pytest.fixture
def compiled_kernels(monkeypatch):
    """The kernel modules defined compiled, as on CUDA (tracing records their launches), whatever mode
    an earlier test defined them in (tests/test_kernels.py interprets them without CUDA); afterwards
    defined again in the mode the process had."""
    names = [f"vnm_compile.kernels.{name}" for name in ("common", "decode", "prefill", "tuning", "dispatch")]
    define = lambda: {name.rsplit(".", 1)[1]: importlib.reload(importlib.import_module(name)) for name in names}
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    yield define()
    monkeypatch.undo()
    define()


def test_symbolic_count_takes_the_kernels_planned_for_its_range_without_a_guard(monkeypatch, compiled_kernels):
    """Traced for CUDA (fake tensors: no GPU needed), vnm.linear with a symbolic token count and
    plan_symbolic launches the kernels planned for the largest count in the symbol's range: where
    unbounded (a dynamic graph whose small counts run graphs of their own) many tokens, the prefill
    kernel on x.T; in each bucket of up to 16 tokens, the decode kernel on x. It adds no guard on the
    count; without plan_symbolic it defers to the per-call op."""
    from torch._guards import TracingContext

    from vnm_compile import backend

    dispatch, tuning = compiled_kernels["dispatch"], compiled_kernels["tuning"]
    for module in (dispatch, tuning):  # no GPU to name: no measured table, the default rules
        monkeypatch.setattr(module, "gpu_slug", lambda device: "no-such-gpu")
    launches = []
    real_prefill, real_decode = dispatch.launch_prefill, dispatch.launch_decode
    monkeypatch.setattr(dispatch, "launch_prefill", lambda kernel, xt, *args, **kwargs: launches.append(
        ("prefill", tuple(xt.shape))) or real_prefill(kernel, xt, *args, **kwargs))
    monkeypatch.setattr(dispatch, "launch_decode", lambda kernel, x, *args, **kwargs: launches.append(
        ("decode", tuple(x.shape))) or real_decode(kernel, x, *args, **kwargs))
    weight = vnm.VNMWeight.from_dense(torch.randn(256, 512).half(), 64, 8)
    layout = vnm.kernels.prefill_layout(weight)
    shape_env, mode, symbol, tokens = _symbolic_tokens(12)
    with mode:
        values, columns, metadata, expanded, channels = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in (
            weight.values, weight.columns, weight.metadata, layout.expanded, layout.channels)]
    decoded = [(bucket, True, [("decode", (tokens, 512))]) for bucket in ((2, 2), (3, 4), (5, 8), (9, 16))]
    for bucket, plan_symbolic, launched in ((None, False, []), (None, True, [("prefill", (512, tokens))]), *decoded):
        launches.clear()
        context = backend.bounded(TracingContext(mode), {symbol: bucket}) if bucket else contextlib.nullcontext()
        with context, mode:
            x = torch.empty(tokens, 1, 512, device="cuda", dtype=torch.float16)
            y = torch.ops.vnm.linear(x, values, columns, metadata, None, 64, 8, 512, None, expanded, channels,
                                     None, plan_symbolic=plan_symbolic)
            assert y.shape == (tokens, 1, 256) and launches == launched, (bucket, plan_symbolic)
    assert not shape_env.guards


def test_non_finite_weight_names_the_layer():
    torch.manual_seed(0)
    model = _Block().eval()
    with torch.no_grad():
        model.down.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"^layer down: its weight down\.weight holds NaN or Inf"):
        vnm.sparsify(model, torch.randn(2, 5, 48), vnm.VNMConfig(**OPTIONS))


def test_non_finite_calibration_names_the_layer():
    torch.manual_seed(0)
    model = _Block().eval()
    x = torch.randn(2, 5, 48)
    x[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^layer up: its input statistics \(example inputs\) hold NaN or Inf"):
        vnm.sparsify(model, x, vnm.VNMConfig(**OPTIONS))


def test_silent_inputs_are_logged(caplog):
    """An example batch of zeros leaves every RIA score zero: the layer's mask would be arbitrary."""
    torch.manual_seed(0)
    model = _Block().eval()
    model.norm.bias.data.zero_()
    model.norm.weight.data.zero_()  # the norm outputs zeros: `up` sees nothing
    with caplog.at_level(logging.WARNING, logger="vnm_compile"):
        vnm.sparsify(model, torch.randn(2, 5, 48), vnm.VNMConfig(**OPTIONS))
    assert any("layer up: its inputs (example inputs) are all zero" in message for message in caplog.messages)
    assert not any("layer down:" in message for message in caplog.messages)


def _tiny_llama_cuda():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).half().cuda().eval()


GPU_OPTIONS = {"v": 64, "m": 8, "criterion": "abs", "permute": False, "skip": ["lm_head"]}


@pytest.mark.gpu
def test_gpu_reduce_overhead_replays_without_copying_weights():
    """mode="reduce-overhead" records a CUDA graph and replays it; the weights (compressed, permuted or
    the parameters themselves) are static inputs, so a replay copies only the token ids."""
    from torch._inductor import cudagraph_trees

    model = _tiny_llama_cuda()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="vnm", options={**GPU_OPTIONS, "mode": "reduce-overhead"})
    ids = torch.randint(0, 256, (1, 1), device="cuda")
    with torch.no_grad():
        for _ in range(3):
            compiled(input_ids=ids, use_cache=False)
    assert counters["inductor"]["cudagraph_skips"] == 0
    manager = cudagraph_trees.get_container(torch.cuda.current_device()).tree_manager
    recorded = [node for nodes in manager.roots.values() for node in nodes]
    assert recorded  # a CUDA graph was recorded, and replayed on the later calls
    for node in recorded:  # a replay copies the token ids (and a position), not the weights
        assert len(node.non_static_input_idx) <= 2, (len(node.non_static_input_idx), len(node.static_input_idxs))


@pytest.mark.gpu
def test_gpu_small_token_counts_skip_the_per_call_dispatch(monkeypatch):
    """On CUDA, token counts up to small_tokens run in graphs per bucket, and larger counts the dynamic
    graph with the kernels planned for many tokens: neither calls the per-call op, which the dynamic
    graph calls when it serves every count (small_tokens=0); all give what that graph gives."""
    from vnm_compile.kernels import dispatch

    calls = []
    planned = dispatch.planned_linear
    monkeypatch.setattr(dispatch, "planned_linear",
                        lambda x, *args: calls.append(tuple(x.shape)) or planned(x, *args))
    model = _tiny_llama_cuda()
    logits = {}
    for small_tokens in (16, 0):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="vnm", options={**GPU_OPTIONS, "small_tokens": small_tokens})
        with torch.no_grad():
            for batch, tokens in ((1, 40), (4, 1), (3, 1), (4, 1), (2, 24)):
                calls.clear()
                generator = torch.Generator("cuda").manual_seed(batch * 100 + tokens)
                ids = torch.randint(0, 256, (batch, tokens), device="cuda", generator=generator)
                logits[small_tokens, batch, tokens] = compiled(input_ids=ids, use_cache=False).logits.float()
                # a batch above 1 runs Dynamo's dynamic-shape graph, which dispatches per call only
                # where no bucket graphs take its small counts
                dispatched = batch > 1 and not small_tokens
                assert bool(calls) == dispatched, (small_tokens, batch, tokens)
    for (_, batch, tokens), value in logits.items():
        torch.testing.assert_close(value, logits[0, batch, tokens], rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_decode_graph_reads_the_stored_weights_as_they_are():
    """A decode step's graph launches each sparse linear's kernel on the compressed tensors as stored:
    no per-call op reinterprets or copies a weight (each would cost CPU time at every step)."""
    from torch._inductor.utils import run_and_get_code

    model = _tiny_llama_cuda()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vnm", options=GPU_OPTIONS)
    ids = torch.randint(0, 256, (1, 1), device="cuda")
    with torch.no_grad():
        _, sources = run_and_get_code(lambda: compiled(input_ids=ids, use_cache=False))
    code = "\n".join(sources)
    assert "vnm_decode_kernel" in code
    assert "view.dtype" not in code


GENERATE = dict(max_new_tokens=16, do_sample=False, cache_implementation="static", pad_token_id=0)


@pytest.mark.gpu
def test_gpu_generate_with_compiled_forward_matches_eager():
    """generate() with a static KV cache and model.forward compiled by the backend (prompt and decode
    steps both sparse) gives the greedy tokens of the same sparse model run eagerly. (With CUDA graphs,
    transformers' CompileConfig is the way: see the next test.)"""
    model = _tiny_llama_cuda()
    prompt = torch.randint(0, 256, (2, 12), device="cuda")
    eager = vnm.sparsify(model, {"input_ids": prompt, "use_cache": False}, vnm.VNMConfig(**GPU_OPTIONS))
    with torch.no_grad():
        expected = eager.generate(prompt, **GENERATE)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="vnm", options=GPU_OPTIONS)
    with torch.no_grad():
        got = model.generate(prompt, **GENERATE)
    assert torch.equal(got, expected)


@pytest.mark.gpu
def test_gpu_generate_through_transformers_compile_config():
    """transformers' own compile path takes the backend (CompileConfig; torch.compile takes a mode or
    options, so the mode goes in the options). It compiles the decode steps only: the prompt runs the
    uncompiled (dense) model, so the first new token is the dense model's."""
    from transformers import CompileConfig

    model = _tiny_llama_cuda()
    prompt = torch.randint(0, 256, (2, 12), device="cuda")
    with torch.no_grad():
        dense = model.generate(prompt, **{**GENERATE, "max_new_tokens": 1})
    torch._dynamo.reset()
    before = vnm.reports()[-1] if vnm.reports() else None
    config = CompileConfig(backend="vnm", mode=None, options={**GPU_OPTIONS, "mode": "reduce-overhead"})
    with torch.no_grad():
        got = model.generate(prompt, **GENERATE, compile_config=config)
    assert got.shape == (2, 28) and torch.equal(got[:, :13], dense)
    assert vnm.reports()[-1] is not before and vnm.reports()[-1].sparse_layers


@pytest.mark.gpu
def test_gpu_backend_keeps_the_sparse_tensor_core_layout_where_it_is_measured_faster(monkeypatch):
    """With a dispatch table in which the sparse tensor-core kernel measured fastest, the backend keeps
    its layout by default and the graphs run it; the logits match those of the Triton kernels."""
    from vnm_compile.kernels import dispatch, sparse_mma

    if not sparse_mma.available("cuda"):
        pytest.skip("no sparse-MMA support (sm_80+ and NVRTC)")
    launches = []
    compiled_kernel = sparse_mma.compiled_kernel
    monkeypatch.setattr(sparse_mma, "compiled_kernel",
                        lambda *args, **kwargs: launches.append(args[0]) or compiled_kernel(*args, **kwargs))

    class MeasuredFastest(dict):
        def get(self, key, default=None):
            return {"path": "prefill", "sparse_us": 10.0, "dense_us": 20.0, "mma_us": 5.0}

    model = _tiny_llama_cuda()
    logits = {}
    for layout in (False, None):
        if layout is None:
            monkeypatch.setattr(dispatch, "load_table", lambda slug: {"dispatch": MeasuredFastest(), "rules": {}})
        torch._dynamo.reset()
        launches.clear()
        compiled = torch.compile(model, backend="vnm", options={**GPU_OPTIONS, "sparse_mma_layout": layout})
        with torch.no_grad():
            logits[layout] = [compiled(input_ids=torch.randint(0, 256, shape, device="cuda",
                                                               generator=torch.Generator("cuda").manual_seed(1)),
                                       use_cache=False).logits for shape in ((1, 40), (4, 1), (2, 24))]
        assert bool(launches) == (layout is None)
    for triton_logits, mma_logits in zip(logits[False], logits[None]):
        torch.testing.assert_close(mma_logits, triton_logits, rtol=2e-2, atol=2e-2)
