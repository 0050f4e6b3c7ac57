"""passes/layout.py: which sparse linears read their input channel-major, and that nothing changes."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from vnm_compile.format import VNMWeight
from vnm_compile.passes import channel_major_inputs
from vnm_compile.passes.layout import _name


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
        return self.sparse("fc2", F.gelu(hidden)) + self.sparse("fc3", F.silu(gate) * up) + self.sparse("fc4", merged * 0.5)


def traced(tokens: int, device: str) -> fx.GraphModule:
    """The block's graph, each input of a vnm.linear carrying an example value of `tokens` tokens
    on `device` (fake: the pass reads only the metadata)."""
    gm = fx.symbolic_trace(Block())
    with FakeTensorMode():
        for node in gm.graph.nodes:
            if node.target is torch.ops.vnm.linear.default:
                node.args[0].meta["val"] = torch.empty(2, tokens // 2, node.args[-1], device=device)
            elif _name(node) == "split":  # Dynamo's example value of a split: its pieces
                node.meta["val"] = tuple(torch.empty(2, tokens // 2, 32, device=device) for _ in range(2))
    return gm


def copied_inputs(gm: fx.GraphModule) -> dict[str, str]:
    return {node.name: node.args[0].args[0].name for node in gm.graph.nodes
            if node.target is torch.ops.vnm.linear.default and node.args[0].op == "call_function"
            and node.args[0].target.__name__ == "_channel_major"}


def test_inputs_made_from_kernel_outputs_become_channel_major():
    gm = traced(64, "cuda")
    changed = channel_major_inputs(gm)
    copied = copied_inputs(gm)
    assert sorted(changed) == sorted(copied)
    # fc2, fc3 and fc4 read elementwise functions of fc1; fc1 reads a norm: left row-major
    assert set(copied.values()) == {"gelu", "mul", "mul_1"}


@pytest.mark.parametrize("tokens,device", [(32, "cuda"), (64, "cpu")])
def test_few_tokens_and_cpu_graphs_are_left_alone(tokens, device):
    gm = traced(tokens, device)
    assert channel_major_inputs(gm) == [] and copied_inputs(gm) == {}


def test_channel_major_graph_computes_the_same():
    gm = traced(64, "cuda")
    x = torch.randn(2, 32, 32)
    expected = gm(x)
    channel_major_inputs(gm)
    assert copied_inputs(gm)
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
