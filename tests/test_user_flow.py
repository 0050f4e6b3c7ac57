"""The ordinary torch.compile flow: one compile, then whatever token counts come; bad weights and
silent inputs are named; on a GPU, CUDA graphs replay and generate() matches eager."""

import contextlib
import importlib
import logging

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


def test_small_token_counts_run_static_graphs_of_their_own(monkeypatch):
    """Token counts up to static_tokens run in a graph compiled for that count: as Inductor traces it,
    its sparse linears see the count as a number (so on CUDA the kernels are launched directly), where
    the dynamic graph's see a symbol; all match float64, and Dynamo makes no extra graph. The CPU
    stands in for CUDA here: there both kinds of graph run the reference."""
    from vnm_compile import backend
    from vnm_compile.kernels import op

    monkeypatch.setattr(vnm_config, "STATIC_GRAPH_DEVICES", ("cuda", "cpu"))
    traced = []  # per compile: the token counts vnm.linear saw while Inductor traced it (None: a symbol)
    floors = []  # per compile: the min_tokens its vnm.linear nodes carry
    lowering = []

    def static_count(sizes):
        count = real_static_count(sizes)
        if lowering:
            traced[-1].add(count)
        return count

    def lower(state, example_inputs, record=False):
        traced.append(set())
        floors.append({node.kwargs.get("min_tokens") for node in state.graph.graph.nodes
                       if node.target is torch.ops.vnm.linear.default})
        lowering.append(True)
        try:
            return real_lower(state, example_inputs, record)
        finally:
            lowering.pop()

    real_static_count, real_lower = op.static_count, backend.lower
    monkeypatch.setattr(op, "static_count", static_count)
    monkeypatch.setattr(backend, "lower", lower)
    torch.manual_seed(0)
    model = _Block().eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="vnm", options={**OPTIONS, "static_tokens": 4})
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        for tokens, compiles in ((129, [{258}]), (3, [{None}, {6}]), (17, []), (2, [{4}]), (3, []), (9, [])):
            traced.clear()
            x = torch.randn(2, tokens, 48)
            error = (compiled(x).double() - _reference(model, x)).norm() / _reference(model, x).norm()
            assert error < 1e-5, tokens
            assert traced == compiles, tokens
    assert counters["stats"]["unique_graphs"] == 2  # the first static graph and the dynamic one
    assert floors[1] == {5}  # the dynamic graph's kernels are planned for counts above its static graphs'
    traced.clear()
    floors.clear()
    torch._dynamo.reset()
    replayed = torch.compile(model, backend="vnm", options={**OPTIONS, "static_tokens": 4, "mode": "reduce-overhead"})
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        for tokens in (129, 3, 2):
            replayed(torch.randn(2, tokens, 48))
    assert traced == [{258}, {None}]  # CUDA graph replays skip the dispatch: no static graphs
    assert floors[1] == {None}  # ... so the dynamic graph serves every count


def test_a_static_graph_that_fails_to_compile_leaves_the_dynamic_graph(monkeypatch, caplog):
    from vnm_compile import backend

    monkeypatch.setattr(vnm_config, "STATIC_GRAPH_DEVICES", ("cuda", "cpu"))

    def refuse(*args, **kwargs):
        raise RuntimeError("no static graph today")

    monkeypatch.setattr(backend, "pinned", refuse)
    torch.manual_seed(0)
    model = _Block().eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vnm", options={**OPTIONS, "static_tokens": 4})
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="vnm_compile"):
        for tokens in (129, 3, 3):
            x = torch.randn(2, tokens, 48)
            error = (compiled(x).double() - _reference(model, x)).norm() / _reference(model, x).norm()
            assert error < 1e-5, tokens
    failures = [r for r in caplog.records if "no static graph for token sizes (3,)" in r.getMessage()]
    assert len(failures) == 1 and "no static graph today" in failures[0].getMessage()


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


def test_pinned_token_count_takes_the_static_kernel_path(monkeypatch):
    """Traced for CUDA (fake tensors: no GPU needed), vnm.linear with a symbolic token count defers to
    the per-call op; with the symbol pinned, as the backend's static graphs are compiled, it takes the
    kernel path with the pinned count, pin after pin (no cache serves one pin's shapes to another)."""
    from torch._guards import TracingContext

    from vnm_compile import backend
    from vnm_compile.kernels import dispatch

    paths = []  # the token count of each call that reached the kernel entry (stubbed: nothing launches)
    monkeypatch.setattr(dispatch, "kernel_linear", lambda x, operands, **kwargs: paths.append(x.shape[0])
                        or x.new_empty(x.shape[0], operands.rows))
    weight = vnm.VNMWeight.from_dense(torch.randn(256, 512).half(), 64, 8)
    _, mode, symbol, tokens = _symbolic_tokens(5)
    with mode:
        stored = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in (weight.values, weight.columns,
                                                                               weight.metadata)]
    for pin in (None, 4, 3, 4):
        paths.clear()
        with backend.pinned(TracingContext(mode), {symbol: pin}) if pin else contextlib.nullcontext(), mode:
            x = torch.empty(tokens, 1, 512, device="cuda", dtype=torch.float16)  # fresh, as AOT fakes its inputs
            y = torch.ops.vnm.linear(x, *stored, None, 64, 8, 512)
            assert y.shape[1:] == (1, 256) and y.shape[0] == (pin or tokens)
        assert paths == ([pin] if pin else []), pin


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


def test_symbolic_count_above_the_static_graphs_takes_the_kernels_without_a_guard(monkeypatch, compiled_kernels):
    """Traced for CUDA (fake tensors: no GPU needed), vnm.linear with a symbolic token count and
    min_tokens above 1 (a dynamic graph whose small counts run static graphs of their own) takes the
    kernels planned for many tokens, the prefill kernel on x.T, and adds no guard on the count;
    without min_tokens it defers to the per-call op."""
    dispatch, tuning = compiled_kernels["dispatch"], compiled_kernels["tuning"]
    for module in (dispatch, tuning):  # no GPU to name: no measured table, the default rules
        monkeypatch.setattr(module, "gpu_slug", lambda device: "no-such-gpu")
    launches = []
    real_launch = dispatch.launch_prefill
    monkeypatch.setattr(dispatch, "launch_prefill",
                        lambda kernel, xt, *args, **kwargs: launches.append(tuple(xt.shape))
                        or real_launch(kernel, xt, *args, **kwargs))
    weight = vnm.VNMWeight.from_dense(torch.randn(256, 512).half(), 64, 8)
    layout = vnm.kernels.prefill_layout(weight)
    shape_env, mode, _, tokens = _symbolic_tokens(40)
    with mode:
        stored = [torch.empty(t.shape, dtype=t.dtype, device="cuda") for t in (
            weight.values, weight.columns, weight.metadata, layout.expanded, layout.channels)]
        x = torch.empty(tokens, 1, 512, device="cuda", dtype=torch.float16)
        values, columns, metadata, expanded, channels = stored
        for min_tokens, launched in ((1, []), (17, [(512, tokens)])):
            launches.clear()
            y = torch.ops.vnm.linear(x, values, columns, metadata, None, 64, 8, 512, None, expanded, channels,
                                     None, min_tokens=min_tokens)
            assert y.shape == (tokens, 1, 256) and launches == launched, min_tokens
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
    """On CUDA, token counts up to static_tokens run in static graphs, and larger counts the dynamic
    graph with the kernels planned for many tokens: neither calls the per-call op, which the dynamic
    graph calls when it serves every count (static_tokens=0); all give what that graph gives."""
    from vnm_compile.kernels import dispatch

    calls = []
    planned = dispatch.planned_linear
    monkeypatch.setattr(dispatch, "planned_linear",
                        lambda x, *args: calls.append(tuple(x.shape)) or planned(x, *args))
    model = _tiny_llama_cuda()
    logits = {}
    for static_tokens in (16, 0):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="vnm", options={**GPU_OPTIONS, "static_tokens": static_tokens})
        with torch.no_grad():
            for batch, tokens in ((1, 40), (4, 1), (3, 1), (4, 1), (2, 24)):
                calls.clear()
                generator = torch.Generator("cuda").manual_seed(batch * 100 + tokens)
                ids = torch.randint(0, 256, (batch, tokens), device="cuda", generator=generator)
                logits[static_tokens, batch, tokens] = compiled(input_ids=ids, use_cache=False).logits.float()
                # a batch above 1 runs Dynamo's dynamic-shape graph, which dispatches per call only
                # where no static graphs take its small counts
                dispatched = batch > 1 and not static_tokens
                assert bool(calls) == dispatched, (static_tokens, batch, tokens)
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
