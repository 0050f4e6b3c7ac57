"""passes/layout.py: which sparse linears read their input or write their output channel-major, and
that nothing changes."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from vnm_compile.format import VNMWeight
from vnm_compile.passes.layout import _name, channel_major_layouts

SHAPES = {"fc1": (64, 32), "fc2": (32, 64), "fc3": (32, 32), "fc4": (32, 64)}  # (out, in) features


class Block(nn.Module):
    """LayerNorm -> fc1, whose output reaches fc2 through GELU, fc3 through SwiGLU on its halves and
    fc4 through a head merge."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        for name, (rows, cols) in SHAPES.items():
            weight = VNMWeight.from_dense(torch.randn(rows, cols), 16, 8)
            for part in ("values", "columns", "metadata"):
                self.register_buffer(f"{name}_{part}", getattr(weight, part))

    def sparse(self, name, x):
        return torch.ops.vnm.linear.default(x, getattr(self, f"{name}_values"), getattr(self, f"{name}_columns"),
                                            getattr(self, f"{name}_metadata"), None, 16, 8, SHAPES[name][1])

    def forward(self, x):
        hidden = self.sparse("fc1", F.layer_norm(x, (32,)))
        merged = hidden.view(x.shape[0], x.shape[1], 4, 16).transpose(1, 2).reshape(x.shape[0], x.shape[1], 64)
        gate, up = hidden.split(32, dim=-1)
        return (self.sparse("fc2", F.gelu(hidden)) + self.sparse("fc3", F.silu(gate) * up)
                + self.sparse("fc4", merged * 0.5))


class Mlp(Block):
    """fc1's output reaches fc2 through ReLU and fc3 through a gated product of its halves, nothing
    else; with `residual`, it is also added to the result. (ReLU and a product give the same bits on
    any layout; CPU GELU and SiLU round differently on strided inputs.)"""

    def __init__(self, residual: bool = False):
        super().__init__()
        self.residual = residual

    def forward(self, x):
        hidden = self.sparse("fc1", F.layer_norm(x, (32,)))
        gate, up = hidden.split(32, dim=-1)
        out = self.sparse("fc2", F.relu(hidden)) + self.sparse("fc3", F.relu(gate) * up)
        return out + gate if self.residual else out


def traced(tokens: int, device: str, module: nn.Module | None = None, mode: FakeTensorMode | None = None
           ) -> fx.GraphModule:
    """The module's graph (default: Block), each input of a vnm.linear carrying an example value of
    `tokens` tokens on `device` (fake: the pass reads only the metadata; `tokens` may be symbolic)."""
    gm = fx.symbolic_trace(module or Block())
    with mode or FakeTensorMode():
        for node in gm.graph.nodes:
            if node.target is torch.ops.vnm.linear.default:
                node.args[0].meta["val"] = torch.empty(2, tokens // 2, node.args[-1], device=device)
            elif _name(node) == "split":  # Dynamo's example value of a split: its pieces
                node.meta["val"] = tuple(torch.empty(2, tokens // 2, 32, device=device) for _ in range(2))
    return gm


def copied_inputs(gm: fx.GraphModule) -> dict[str, str]:
    return {node.name: node.args[0].args[0].name for node in gm.graph.nodes
            if node.target is torch.ops.vnm.linear.default and node.args[0].op == "call_function"
            and node.args[0].target.__name__ == "channel_major"}


def channel_major_writers(gm: fx.GraphModule) -> list[str]:
    return [node.name for node in gm.graph.nodes if node.kwargs.get("channel_major_out")]


def test_inputs_made_from_kernel_outputs_become_channel_major():
    gm = traced(64, "cuda")
    changed = channel_major_layouts(gm)
    copied = copied_inputs(gm)
    assert sorted(changed["inputs"]) == sorted(copied)
    # fc2, fc3 and fc4 read elementwise functions of fc1; fc1 reads a norm: left row-major
    assert set(copied.values()) == {"gelu", "mul", "mul_1"}
    # fc1's output also goes through views that merge dimensions (the head merge): written row-major
    assert changed["outputs"] == [] and channel_major_writers(gm) == []


def test_output_read_only_by_channel_major_copies_is_written_channel_major():
    gm = traced(64, "cuda", Mlp())
    changed = channel_major_layouts(gm)
    assert sorted(copied_inputs(gm).values()) == ["mul", "relu"]
    assert changed["outputs"] == channel_major_writers(gm) == ["linear_default"]  # fc1


def test_output_with_another_use_stays_row_major():
    gm = traced(64, "cuda", Mlp(residual=True))
    changed = channel_major_layouts(gm)
    assert sorted(copied_inputs(gm).values()) == ["mul", "relu"] and changed["outputs"] == []


@pytest.mark.parametrize("tokens,device", [(32, "cuda"), (64, "cpu")])
def test_few_tokens_and_cpu_graphs_are_left_alone(tokens, device):
    gm = traced(tokens, device, Mlp())
    assert channel_major_layouts(gm) == {"inputs": [], "outputs": []}
    assert copied_inputs(gm) == {} and channel_major_writers(gm) == []


@pytest.mark.parametrize("plan_symbolic,highest,copied", [
    (False, None, []), (True, None, ["mul", "relu"]), (True, 32, []), (True, 64, ["mul", "relu"])])
def test_a_symbolic_count_counts_as_the_count_the_op_plans_for(plan_symbolic, highest, copied):
    """A dynamic-shape graph traced with few tokens: left alone, unless its sparse linears plan for
    their count (plan_symbolic: its small counts run graphs of their own), whose largest value (the
    range of a bucket's graph, or many tokens where unbounded) is more than the prefill kernel reads
    row-major."""
    from torch._dynamo.source import LocalSource, TensorProperty, TensorPropertySource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
    from torch.utils._sympy.value_ranges import ValueRanges

    shape_env = ShapeEnv()
    source = TensorPropertySource(LocalSource("x"), TensorProperty.SIZE, 1)
    symbol = shape_env.create_symbol(4, source=source, dynamic_dim=DimDynamic.DYNAMIC)
    if highest is not None:
        shape_env.var_to_range[symbol] = ValueRanges(2, highest)  # as the backend compiles a bucket's graph
    tokens = shape_env.create_symintnode(symbol, hint=4, source=source)
    gm = traced(tokens, "cuda", Mlp(), FakeTensorMode(shape_env=shape_env))
    for node in gm.graph.nodes:
        if node.target is torch.ops.vnm.linear.default:
            node.update_kwarg("plan_symbolic", plan_symbolic)
    channel_major_layouts(gm)
    assert sorted(copied_inputs(gm).values()) == copied


@pytest.mark.parametrize("module", [Block, Mlp])
def test_channel_major_graph_computes_the_same(module):
    gm = traced(64, "cuda", module())
    x = torch.randn(2, 32, 32)
    expected = gm(x)
    channel_major_layouts(gm)
    assert copied_inputs(gm)
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


def test_op_writes_channel_major_on_request():
    block = Block()
    x = torch.randn(2, 5, 32)
    args = (x, block.fc1_values, block.fc1_columns, block.fc1_metadata, None, 16, 8, 32)
    row_major = torch.ops.vnm.linear(*args)
    written = torch.ops.vnm.linear(*args, channel_major_out=True)
    assert row_major.is_contiguous() and written.permute(2, 0, 1).is_contiguous()
    assert torch.equal(written, row_major)


class DenseMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(256), nn.Linear(256, 1024), nn.Linear(1024, 256)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


@pytest.mark.gpu
def test_gpu_compiled_mlp_writes_fc1_channel_major():
    """On CUDA, with Inductor: fc1 writes its output channel-major, the GELU keeps that layout, fc2
    reads it in place, and the result is what the graph computes without the layout stage."""
    import vnm_compile as vnm
    from vnm_compile.backend import vnm_backend  # not the name "vnm": the GPU machine runs tests uninstalled

    torch.manual_seed(0)
    model = DenseMlp().cuda().half().eval()
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.float16)
    outputs, reports = {}, {}
    for inductor in (True, False):
        torch._dynamo.reset()
        with torch.no_grad():
            outputs[inductor] = torch.compile(model, backend=vnm_backend, options={"m": 8, "verify": True,
                                                                                    "inductor": inductor})(x)
        reports[inductor] = vnm.reports()[-1]
        assert reports[inductor].verification.sparse_error < 1e-2
    layout_code = next(stage.after for stage in reports[True].stages if stage.stage == "layout")
    assert layout_code.count("channel_major_out = True") == 1 and "channel_major(gelu)" in layout_code
    torch.testing.assert_close(outputs[True], outputs[False], rtol=2e-3, atol=2e-3)
