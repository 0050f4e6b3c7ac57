"""torch.compile(backend="vnm") on random-init tiny transformers models: Llama, GPT-2, BERT, ViT.

Each model is compiled twice per module through the entry point: sparse, lowered by Inductor, and
permute-only (sparsify=False) run as the rewritten FX graph; the tests read those two results.
"""

import copy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config
from torch import nn
from torch._dynamo.utils import counters

import vnm_compile as vnm

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

OPTIONS = {"v": 16, "m": 8, "min_features": 48, "skip": ["lm_head"]}


def _llama():
    config = tiny_config("llama")
    return transformers.LlamaForCausalLM(config), {"input_ids": torch.randint(0, 128, (2, 9)), "use_cache": False}


def _gpt2():
    config = tiny_config("gpt2")
    return transformers.GPT2LMHeadModel(config), {"input_ids": torch.randint(0, 128, (2, 9)), "use_cache": False}


def _bert():
    config = tiny_config("bert")
    return transformers.BertModel(config), {"input_ids": torch.randint(0, 128, (2, 9))}


def _vit():
    config = tiny_config("vit")
    return transformers.ViTModel(config), {"pixel_values": torch.randn(2, 3, 32, 32)}


MODELS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert, "vit": _vit}

# Per model: the linears expected dense and why (the rest is expected sparse), and which channel
# spaces must end up permuted (named by a linear reading them).
EXPECTED = {
    "llama": ({"lm_head": "matches skip pattern 'lm_head'",
               **{f"model.layers.{i}.self_attn.{p}_proj": "32x64 is smaller than min_features=48"
                  for i in range(2) for p in "kv"}},
              ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),
    "gpt2": ({"lm_head": "matches skip pattern 'lm_head'"},
             ["lm_head", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]),
    "bert": ({}, ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]),
    "vit": ({}, ["layers.0.mlp.fc2", "layers.1.mlp.fc2"]),
}


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output.to_tuple()[0]


def _compile(model, inputs, options):
    counters.clear()
    with torch.no_grad():
        output = _first(torch.compile(model, backend="vnm", options=options)(**inputs))
    return SimpleNamespace(output=output, report=vnm.reports()[-1], graphs=counters["stats"]["unique_graphs"],
                           breaks=sum(counters["graph_break"].values()))


@pytest.fixture(scope="module", params=sorted(MODELS))
def run(request):
    torch.manual_seed(0)
    model, inputs = MODELS[request.param]()
    model.eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        expected = _first(model(**inputs))
    sparse = _compile(model, inputs, OPTIONS)
    dense = _compile(model, inputs, {**OPTIONS, "sparsify": False, "inductor": False})
    return SimpleNamespace(name=request.param, model=model, inputs=inputs, before=before, expected=expected,
                           sparse=sparse, dense=dense)


def test_permute_only_equals_original(run):  # (a)
    assert any(group.permuted for group in run.dense.report.groups)
    torch.testing.assert_close(run.dense.output, run.expected, rtol=1e-5, atol=1e-5)


def masked_reference(model, report):
    """The model with every converted layer's weight replaced by its masked dense weight."""
    reference = copy.deepcopy(model)
    for layer in report.sparse_layers:
        module = reference.get_submodule(layer.name)
        weight = layer.masked_weight()
        # a new Parameter, not copy_: a weight tied to an embedding must not change the embedding
        module.weight = nn.Parameter(weight.t() if type(module).__name__ == "Conv1D" else weight)
    return reference


def test_sparse_equals_masked_dense_reference(run):  # (b)
    with torch.no_grad():
        reference = _first(masked_reference(run.model, run.sparse.report)(**run.inputs))
    torch.testing.assert_close(run.sparse.output, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(run.sparse.output, run.expected, rtol=1e-2, atol=1e-2)  # it did sparsify


def test_expected_linears_converted_and_skips_have_reasons(run):  # (c)
    dense_reasons, permuted_readers = EXPECTED[run.name]
    layers = {layer.name: layer for layer in run.sparse.report.layers}
    linears = {name for name, module in run.model.named_modules()
               if isinstance(module, vnm.calibration.linear_module_types())}
    assert set(layers) == linears
    assert {name: layer.reason for name, layer in layers.items() if not layer.sparse} == dense_reasons
    for layer in run.sparse.report.sparse_layers:
        assert vnm.is_vnm(layer.weight.mask(), 16, 8) and 0 < layer.retained < 1
    groups = run.sparse.report.groups
    for reader in permuted_readers:
        assert any(reader in group.readers and group.permuted and group.gain >= 0 for group in groups)
    assert all(group.blocked_by for group in groups if not group.permuted and group.retained_before is None)


def test_no_graph_breaks(run):  # (d)
    for result in (run.sparse, run.dense):
        assert result.breaks == 0 and result.graphs == 1


def test_parameters_untouched(run):  # (e)
    after = run.model.state_dict()
    assert after.keys() == run.before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in run.before.items())


def test_permutation_never_retains_less(run):  # (f), with |w| as importance: checked from the weights themselves
    def retained(permute):
        options = {**OPTIONS, "criterion": "abs", "permute": permute, "inductor": False}
        report = _compile(run.model, run.inputs, options).report
        total = 0.0
        for layer in report.sparse_layers:
            weight = run.model.get_submodule(layer.name).weight
            weight = weight.t() if type(run.model.get_submodule(layer.name)).__name__ == "Conv1D" else weight
            kept = layer.masked_weight() != 0
            total += float(weight.detach().abs()[kept].sum(dtype=torch.float64))
        return total, report

    permuted, report = retained(True)
    plain, _ = retained(False)
    assert permuted >= plain * (1 - 1e-9)
    total_importance = sum(layer.importance for layer in report.sparse_layers)
    assert permuted == pytest.approx(report.retained() * total_importance, rel=1e-6)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("options,message", [
    ({"v": 48}, "v must be a power of two"),
    ({"m": 3}, "m must be an integer in"),
    ({"vv": 64}, "unknown vnm option"),
    ({"criterion": "magnitude"}, "criterion must be one of"),
    ({"calibration": {"up": 1}}, "calibration must come from"),
    ({"max_layer_error": -1}, "max_layer_error must be"),
])
def test_bad_options_raise_clearly(options, message):  # (g)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=message):
        torch.compile(_MLP(), backend="vnm", options=options)(torch.randn(3, 64))


def test_grad_mode_runs_but_backward_is_refused():
    torch.manual_seed(0)
    model = _MLP()
    compiled = torch.compile(model, backend="vnm", options={"v": 16, "m": 8})
    x = torch.randn(5, 64)
    out = compiled(x)
    with torch.no_grad():
        torch.testing.assert_close(out, compiled(x))
    with pytest.raises(RuntimeError, match="frozen, permuted and compressed snapshots"):
        out.sum().backward()
    assert all(parameter.grad is None for parameter in model.parameters())


def test_token_dimension_is_dynamic():
    torch.manual_seed(0)
    model = _MLP().eval()
    compiled = torch.compile(model, backend="vnm", options={"v": 16, "m": 8}, dynamic=True)
    counters.clear()
    with torch.no_grad():
        for tokens in (5, 17, 3, 129):  # not 1: Dynamo specialises sizes 0 and 1 by design
            x = torch.randn(2, tokens, 64)
            out = compiled(x)
            assert out.shape == (2, tokens, 64)
    assert counters["stats"]["unique_graphs"] == 1
    report = vnm.reports()[-1]
    reference = masked_reference(model, report)
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-4)


def test_lowered_graph_takes_the_inputs_it_reads_and_its_weights_stay_static(monkeypatch):
    """Inductor gets no input the rewritten graph does not read (the parameters whose layers now read
    compressed buffers: each would be checked at every call), and the weights it does read are static
    inputs, which CUDA graphs never copy: all but the token ids."""
    import torch._functorch.aot_autograd as aot_autograd

    seen = []
    original = aot_autograd._try_get_metadata_from_dynamo

    def recording(mod, param_keys, full_args_num, *args):
        sources, static = original(mod, param_keys, full_args_num, *args)
        seen.append((mod, full_args_num, static))
        return sources, static

    monkeypatch.setattr(aot_autograd, "_try_get_metadata_from_dynamo", recording)
    torch.manual_seed(0)
    model, inputs = _llama()
    model.eval()
    torch._dynamo.reset()
    sparse = _compile(model, inputs, OPTIONS)
    (graph, inputs_count, static), = seen
    placeholders = list(graph.graph.find_nodes(op="placeholder"))
    assert all(node.users for node in placeholders)
    assert inputs_count - len(static) == 1, (inputs_count, static)  # the token ids
    reference = masked_reference(model, sparse.report)
    with torch.no_grad():
        torch.testing.assert_close(sparse.output, _first(reference(**inputs)), rtol=1e-4, atol=1e-4)


def test_lowered_graph_that_reads_one_input():
    """A lone linear's graph reads x alone (its weight and bias are buffers of the rewritten graph): the
    compiled graph takes it from Dynamo's inputs and computes the masked weight's product."""
    torch.manual_seed(0)
    model = nn.Linear(64, 48).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vnm", options={"v": 16, "m": 8, "criterion": "abs", "min_features": 16},
                             dynamic=False)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = compiled(x)
    (layer,) = vnm.reports()[-1].sparse_layers
    expected = x.double() @ layer.masked_weight().double().T + model.bias.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


class _PrefillReady(nn.Module):
    """One sparse linear kept with its prefill layout, as the backend's graphs keep it on CUDA."""

    def __init__(self):
        super().__init__()
        weight = vnm.VNMWeight.from_dense(torch.randn(64, 32).half(), 16, 8)
        layout = vnm.kernels.prefill_layout(weight)
        for name, tensor in (("values", weight.values), ("columns", weight.columns), ("metadata", weight.metadata),
                             ("expanded", layout.expanded), ("channels", layout.channels)):
            self.register_buffer(name, tensor)

    def forward(self, x):
        return torch.ops.vnm.linear.default(x, self.values, self.columns, self.metadata, None, 16, 8, 32, None,
                                            self.expanded, self.channels, None)


@pytest.mark.parametrize("tokens,plan_symbolic,kept", [(1, False, False), (64, False, True), ("any", False, True),
                                                       ("any", True, True), ("2-8", True, False)])
def test_lowered_graph_passes_only_the_operands_its_kernel_reads(monkeypatch, tokens, plan_symbolic, kept):
    """Where the kernel is chosen as Inductor traces the graph (on CUDA, a static count, or a symbolic one
    the op plans for), Inductor gets only the operands that kernel reads: a decode kernel's graph no
    prefill layout (an input checked at every call, never read); the prefill kernel keeps it, and so
    does the per-call op, which chooses later. (No GPU: fake CUDA tensors, the default rules.)"""
    from torch._dynamo.source import LocalSource, TensorProperty, TensorPropertySource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
    from torch.utils._sympy.value_ranges import ValueRanges

    from vnm_compile import lowering
    from vnm_compile.kernels import dispatch

    monkeypatch.setattr(dispatch, "gpu_slug", lambda device: "no-such-gpu")
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_PrefillReady())
    shape_env = ShapeEnv()
    if isinstance(tokens, str):  # symbolic: where plan_symbolic, planned for many tokens, or a bucket's largest
        source = TensorPropertySource(LocalSource("x"), TensorProperty.SIZE, 0)
        symbol = shape_env.create_symbol(4, source=source, dynamic_dim=DimDynamic.DYNAMIC)
        if tokens == "2-8":
            shape_env.var_to_range[symbol] = ValueRanges(2, 8)  # as the backend compiles a bucket's graph
        tokens = shape_env.create_symintnode(symbol, hint=4, source=source)
    with FakeTensorMode(shape_env=shape_env):
        (x,) = gm.graph.find_nodes(op="placeholder")
        x.meta["val"] = torch.empty(tokens, 32, device="cuda", dtype=torch.float16)
    (linear,) = gm.graph.find_nodes(op="call_function", target=torch.ops.vnm.linear.default)
    linear.kwargs = {"plan_symbolic": plan_symbolic}
    lowered, read = lowering._reading_inputs_only(gm)
    buffers = {node.target for node in lowered.graph.find_nodes(op="get_attr")}
    assert buffers == {"values", "columns", "metadata"} | ({"expanded", "channels"} if kept else set())
    assert {name for name, _ in lowered.named_buffers()} == buffers and read == [0]
    assert {node.target for node in gm.graph.find_nodes(op="get_attr")} >= {"expanded", "channels"}  # gm keeps all


def test_backend_found_by_entry_point_without_import():
    code = ("import sys, torch; m = torch.nn.Linear(64, 64); "
            "y = torch.compile(m, backend='vnm', options={'v': 16, 'm': 8, 'inductor': False})(torch.randn(3, 64)); "
            "print('vnm_compile' in sys.modules, tuple(y.shape))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["True", "(3,", "64)"]
