"""vnm_compile.bisect and the config's only= / exclude= globs on a tiny random-init Llama."""

import pytest
import torch
from conftest import tiny_config
from torch import nn

import vnm_compile as vnm

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

PLANTED = "model.layers.0.mlp.up_proj"
# criterion "abs" without permutation: a weight that already is 16:2:8 sparse loses nothing.
CONFIG = vnm.VNMConfig(v=16, m=8, criterion="abs", permute=False, min_features=32, inductor=False)


def _llama():
    torch.manual_seed(0)
    config = tiny_config("llama")
    inputs = {"input_ids": torch.randint(0, 128, (2, 9)), "use_cache": False}
    return transformers.LlamaForCausalLM(config).eval(), inputs


@pytest.fixture(scope="module")
def planted():
    """Every linear already 16:2:8 sparse, except one, whose weight is also scaled by 1e3: only its
    sparsification changes the output."""
    model, inputs = _llama()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != PLANTED:
                module.weight.mul_(vnm.vnm_mask(module.weight.abs(), 16, 8))
        model.get_submodule(PLANTED).weight.mul_(1e3)
    return model, inputs


def test_bisection_finds_the_planted_layer(planted):
    model, inputs = planted
    result = vnm.bisect(model, inputs, CONFIG, budget=32)
    assert result.culprits == [PLANTED]
    assert len(result.steps[0][0]) == 15 and result.full_error > 0.1
    (last_sparse, last_error), = [step for step in result.steps if step[0] == [PLANTED]]
    assert last_error == pytest.approx(result.full_error, rel=1e-3)
    assert all(error < 1e-4 for sparse, error in result.steps if PLANTED not in sparse)
    assert PLANTED in str(result)


def test_budget_stops_the_search_early(planted):
    model, inputs = planted
    calls = []

    def metric(outputs, reference):
        calls.append(1)
        return float((outputs[0] - reference[0]).abs().max())

    result = vnm.bisect(model, inputs, CONFIG, metric=metric, budget=3)
    assert len(calls) == len(result.steps) == 3
    assert PLANTED in result.culprits and 1 < len(result.culprits) < 15


def test_only_and_exclude_select_layers():
    model, inputs = _llama()
    only = vnm.explain(model, inputs, vnm.VNMConfig(v=16, m=8, permute=False, min_features=32, inductor=False,
                                                   only=["mlp.*"], exclude=["layers.1.*"]))
    assert [layer.name for layer in only.sparse_layers] == [
        f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    reasons = {layer.name: layer.reason for layer in only.layers}
    assert reasons["model.layers.1.mlp.up_proj"] == "matches exclude pattern 'layers.1.*'"
    assert reasons["lm_head"] == "matches no pattern of only=['mlp.*']"


def test_bad_arguments_raise_clear_errors(planted):
    model, inputs = planted
    with pytest.raises(ValueError, match="^budget must be a positive number"):
        vnm.bisect(model, inputs, CONFIG, budget=0)
    with pytest.raises(ValueError, match="^metric must be a callable"):
        vnm.bisect(model, inputs, CONFIG, metric="mse")
    with pytest.raises(ValueError, match="^config must be a VNMConfig"):
        vnm.bisect(model, inputs, {"v": 16})
    with pytest.raises(ValueError, match="nothing to bisect"):
        vnm.bisect(model, inputs, vnm.VNMConfig(v=16, m=8, sparsify=False))
    with pytest.raises(ValueError, match="^example_inputs must be"):
        vnm.bisect(model, 3, CONFIG)
