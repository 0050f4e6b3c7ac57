"""The passes on small hand-written models, without Inductor: channel rules, permutation search, verify."""

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vnm_compile as vnm
from vnm_compile.passes.common import graph_parameters, module_path
from vnm_compile.passes.discover import Discovery, Group, LinearSite
from vnm_compile.passes.permute import permute as permute_stage
from vnm_compile.passes.score import Scores
from vnm_compile.passes.verify import VerificationError, check_graphs
from vnm_compile.pipeline import run_passes as transform

CONFIG = vnm.VNMConfig(v=16, m=8, min_features=16, inductor=False)


def capture(model, *args):
    """(graph, example inputs, parameters) as the vnm backend receives them."""
    captured = []

    def keep(gm, example_inputs):
        captured.append((gm, example_inputs, graph_parameters(gm, example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=keep, fullgraph=True)(*args)
    return captured[0]


class Residual(nn.Module):
    """Embedding -> 2 pre-norm MLP blocks (LayerNorm, RMSNorm-by-hand) -> norm -> head."""

    def __init__(self, dim=32, hidden=48, vocab=40):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.up1 = nn.Linear(dim, hidden)
        self.down1 = nn.Linear(hidden, dim)
        self.scale2 = nn.Parameter(torch.rand(dim) + 0.5)
        self.gate2 = nn.Linear(dim, hidden, bias=False)
        self.up2 = nn.Linear(dim, hidden, bias=False)
        self.down2 = nn.Linear(hidden, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.down1(F.gelu(self.up1(self.norm1(x))))
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale2
        x = x + self.down2(F.silu(self.gate2(h)) * self.up2(h))
        return self.head(self.norm(x))


class TimmStyleViT(nn.Module):
    """timm's VisionTransformer layout: conv patches, cls token concat, fused qkv, head on the cls token."""

    def __init__(self, dim=32, heads=2, depth=2, classes=10):
        super().__init__()
        self.heads = heads
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim),
            norm2=nn.LayerNorm(dim), fc1=nn.Linear(dim, 2 * dim), fc2=nn.Linear(2 * dim, dim))) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            batch, tokens, dim = x.shape
            qkv = block["qkv"](block["norm1"](x)).reshape(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            attention = F.scaled_dot_product_attention(q, k, v)
            x = x + block["proj"](attention.transpose(1, 2).reshape(batch, tokens, dim))
            x = x + block["fc2"](F.gelu(block["fc1"](block["norm2"](x))))
        return self.head(self.norm(x)[:, 0])


def test_module_path_from_dynamo_sources():
    assert module_path("L['self']._modules['model']._modules['layers']._modules['3']._parameters['weight']") \
        == "model.layers.3.weight"
    assert module_path("L['self'].transformer.h[0].attn.c_attn") == "transformer.h.0.attn.c_attn"
    assert module_path("L['self']") == ""
    # a forward behind a `wrapper(*args, **kwargs)` decorator (transformers >= 5.25)
    assert module_path("L['args'][0]._modules['lm_head']._parameters['weight']") == "lm_head.weight"
    assert module_path("L['kwargs']['self'].model.layers[2]") == "model.layers.2"


def _passthrough(forward):
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)
    return wrapper


class DecoratedResidual(Residual):
    forward = _passthrough(Residual.forward)


def test_decorated_forward_keeps_module_names():
    """Dynamo sees the module as the wrapper's L['args'][0]: names stay relative to the module."""
    torch.manual_seed(0)
    model = DecoratedResidual().eval()
    _, _, found = capture(model, torch.randint(0, 40, (2, 5)))
    names = {name for name, _ in found.values()}
    assert names == {name for name, _ in model.named_parameters()}


def test_residual_stream_and_mlp_hidden_are_groups():
    torch.manual_seed(0)
    model = Residual().eval()
    gm, inputs, found = capture(model, torch.randint(0, 40, (2, 5)))
    result = transform(gm, inputs, found, CONFIG)
    groups = {frozenset(g.readers + g.writers): g for g in result.report.groups}
    residual = groups[frozenset({"up1", "down1", "gate2", "up2", "down2", "head"})]
    assert residual.blocked_by == [] and residual.permuted
    assert groups[frozenset({"up1", "down1"})].blocked_by == []
    assert groups[frozenset({"gate2", "up2", "down2"})].blocked_by == []
    logits = groups[frozenset({"head"})]
    assert any("graph output" in reason for reason in logits.blocked_by)
    # every parameter dimension of the residual stream is in its group, norms and embedding included
    dims = {dim for dim in result.fold.tensors if dim.startswith(("embed", "norm", "scale2"))}
    assert dims == {"embed.weight", "norm1.weight", "norm1.bias", "scale2", "norm.weight", "norm.bias"}


@pytest.mark.parametrize("sparse", [False, True])
def test_permuted_graph_matches_original(sparse):
    torch.manual_seed(0)
    model = Residual().eval()
    ids = torch.randint(0, 40, (3, 7))
    gm, inputs, found = capture(model, ids)
    config = vnm.VNMConfig(v=16, m=8, min_features=16, inductor=False, sparsify=sparse, verify=True)
    result = transform(gm, inputs, found, config)
    assert result.report.verification.dtype == "float64"
    with torch.no_grad():
        got = result.graph(*inputs)[0]
        expected = model(ids)
    if not sparse:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert any(group.permuted for group in result.report.groups)


def test_timm_style_vit_folds_conv_cls_token_and_positions():
    torch.manual_seed(0)
    model = TimmStyleViT().eval()
    images = torch.randn(2, 3, 16, 16)
    gm, inputs, found = capture(model, images)
    config = vnm.VNMConfig(v=16, m=8, min_features=16, inductor=False, sparsify=False, verify=True)
    result = transform(gm, inputs, found, config)
    residual = next(g for g in result.report.groups if "head" in g.readers)
    assert residual.blocked_by == [] and residual.permuted
    perm = result.fold.tensors
    index = result.report.layers[-1].input_perm  # the head reads the residual stream
    torch.testing.assert_close(perm["cls_token"], model.cls_token[..., index])
    torch.testing.assert_close(perm["patch_embed.weight"], model.patch_embed.weight[index])
    torch.testing.assert_close(perm["pos_embed"], model.pos_embed[..., index])
    qkv = next(g for g in result.report.groups if g.writers == ["blocks.0.qkv"])
    assert any("cuts these channels apart" in r or "splits or merges" in r for r in qkv.blocked_by)
    with torch.no_grad():
        torch.testing.assert_close(result.graph(*inputs)[0], model(images), rtol=1e-5, atol=1e-5)


def test_timm_vit_if_installed():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    gm, inputs, found = capture(model, images)
    result = transform(gm, inputs, found, vnm.VNMConfig(v=16, m=8, min_features=16, inductor=False, verify=True))
    assert result.report.sparse_layers
    assert any(group.permuted for group in result.report.groups)


def test_unknown_op_blocks_with_its_name():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(32, 48)
            self.down = nn.Linear(48, 32)

        def forward(self, x):
            return self.down(torch.cumsum(self.up(x), dim=-1))  # order-dependent along channels

    torch.manual_seed(0)
    gm, inputs, found = capture(Odd().eval(), torch.randn(4, 32))
    result = transform(gm, inputs, found, CONFIG)
    hidden = next(g for g in result.report.groups if g.writers == ["up"])
    assert not hidden.permuted and any("cumsum" in reason for reason in hidden.blocked_by)


def test_skips_carry_reasons():
    torch.manual_seed(0)
    model = Residual().eval()
    gm, inputs, found = capture(model, torch.randint(0, 40, (2, 5)))
    config = vnm.VNMConfig(v=16, m=8, min_features=16, skip=["head", "*2"], inductor=False)
    layers = {layer.name: layer for layer in transform(gm, inputs, found, config).report.layers}
    assert layers["head"].reason == "matches skip pattern 'head'"
    assert layers["up2"].reason == "matches skip pattern '*2'"
    assert layers["up1"].sparse and layers["down1"].sparse
    assert all(layer.reason for layer in layers.values() if not layer.sparse)
    config = vnm.VNMConfig(v=16, m=8, min_features=33, inductor=False)
    layers = transform(gm, inputs, found, config).report.layers
    assert all(layer.reason.endswith("is smaller than min_features=33") for layer in layers)
    config = vnm.VNMConfig(v=16, m=8, min_features=40, dtypes=["float16"], inductor=False)
    layers = transform(gm, inputs, found, config).report.layers
    assert all("float32 is not in dtypes" in layer.reason for layer in layers)


def test_max_layer_error_falls_back_to_dense():
    torch.manual_seed(0)
    gm, inputs, found = capture(Residual().eval(), torch.randint(0, 40, (2, 5)))
    report = transform(gm, inputs, found, vnm.VNMConfig(v=16, m=8, min_features=16, inductor=False,
                                                        max_layer_error=0.01)).report
    assert not report.sparse_layers
    assert all("exceeds max_layer_error=0.01" in layer.reason for layer in report.layers)


def permute(discovery, scores, config):
    """The permute stage on a hand-made discovery and its scores."""
    return permute_stage(SimpleNamespace(discover=discovery, score=scores, config=config, reuse=None))


def _two_layer_problem(n_in, n_hidden, n_out, seed):
    """up writes, down reads one hidden group; heavy-tailed channel importance makes order matter."""
    generator = torch.Generator().manual_seed(seed)
    channel = torch.rand(n_hidden, generator=generator).pow(4) * 10
    scores = {"up": torch.rand(n_hidden, n_in, generator=generator) * (1 + channel[:, None]),
              "down": torch.rand(n_out, n_hidden, generator=generator) * (1 + channel)}
    linears = {"up": LinearSite("up", "up", "x", "up.weight", False, n_hidden, n_in, None, 0),
               "down": LinearSite("down", "down", "up", "down.weight", False, n_out, n_hidden, 0, None)}
    group = Group(0, n_hidden, readers=["down"], writers=["up"])
    return Discovery(linears, {0: group}, {}, {}, {}), Scores(scores, {}, {})


@pytest.mark.parametrize("v,m", [(16, 8), (16, 5), (16, 4), (32, 16)])
def test_permutation_never_loses_and_usually_gains(v, m):
    discovery, scores = _two_layer_problem(48, 96 + 3, 40, seed=v + m)
    config = vnm.VNMConfig(v=v, m=m)
    found = permute(discovery, scores, config)
    search = found.searches[0]
    assert search.after >= search.before
    assert search.after > search.before * 1.001  # heavy-tailed channels: a real gain
    perm = found.perms[0]
    assert sorted(perm.tolist()) == list(range(99))
    # the reported objective is the real one: recompute it from the permutation
    retained = 0.0
    for node, matrix in scores.importance.items():
        permuted = matrix[perm] if node == "up" else matrix[:, perm]
        mask = vnm.vnm_mask(permuted, v, m)
        retained += float((permuted * mask).sum(dtype=torch.float64))
    assert retained == pytest.approx(search.after, rel=1e-9)


def _chains(seed):
    """Two independent problems: up -> mid -> down (two groups sharing mid) and a -> b (one group)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = {"up": (64, 32), "mid": (48, 64), "down": (32, 48), "a": (80, 32), "b": (32, 80)}
    scores = {name: torch.rand(*shape, generator=generator).pow(3) for name, shape in sizes.items()}
    groups_of = {"up": (None, 0), "mid": (0, 1), "down": (1, None), "a": (None, 2), "b": (2, None)}  # in, out
    linears = {name: LinearSite(name, name, "x", f"{name}.weight", False, *sizes[name], *groups_of[name])
               for name in sizes}
    groups = {0: Group(0, 64, readers=["mid"], writers=["up"]), 1: Group(1, 48, readers=["down"], writers=["mid"]),
              2: Group(2, 80, readers=["b"], writers=["a"])}
    return Discovery(linears, groups, {}, {}, {}), Scores(scores, {}, {})


def test_groups_sharing_no_linear_step_together_with_the_same_result(monkeypatch):
    from vnm_compile.passes.permute import _waves

    discovery, scores = _chains(seed=1)
    waves = _waves(list(discovery.groups.values()), scores.importance)
    assert [[group.id for group in wave] for wave in waves] == [[0, 2], [1]]  # 1 shares mid with 0
    config = vnm.VNMConfig(v=16, m=8, permute_rounds=3)
    parallel = permute(discovery, scores, config)
    monkeypatch.setattr("os.cpu_count", lambda: 1)  # one thread: the groups one after the other
    sequential = permute(discovery, scores, config)
    alone = {2: Group(2, 80, readers=["b"], writers=["a"])}  # the second problem without the first
    single = permute(Discovery(discovery.linears, alone, {}, {}, {}), scores, config)
    assert set(parallel.perms) == {0, 1, 2}
    for group in parallel.perms:
        assert torch.equal(parallel.perms[group], sequential.perms[group])
    assert torch.equal(parallel.perms[2], single.perms[2])
    assert parallel.searches[2].after == single.searches[2].after > single.searches[2].before


def test_permutation_respects_the_time_budget():
    discovery, scores = _two_layer_problem(48, 96, 40, seed=0)
    found = permute(discovery, scores, vnm.VNMConfig(v=16, m=8, permute_budget_s=1e-9))
    assert found.perms == {} and "time budget" in found.stopped


def test_verify_names_the_first_node_that_differs():
    torch.manual_seed(0)
    model = Residual().eval()
    gm, inputs, found = capture(model, torch.randint(0, 40, (2, 5)))
    result = transform(gm, inputs, found, vnm.VNMConfig(v=16, m=8, min_features=16, inductor=False, sparsify=False))
    assert result.report.groups[0].permuted
    # Pretend the residual stream had kept its order: the first value carrying it must be flagged.
    from vnm_compile.passes.permute import Permutations

    wrong = Permutations({}, {}, {})
    with pytest.raises(VerificationError, match="differs first at node 'x'"):
        check_graphs(gm, result.fold.gm, None, result.discover, wrong, result.inputs)
