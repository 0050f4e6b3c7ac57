import copy

import pytest
import torch

import vnm_compile as vnm
from vnm_compile.refine import refine_block
from vnm_compile.sequential import compress_sequential

transformers = pytest.importorskip("transformers")


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def token_batches(count: int, length: int = 33, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 101, (1, length), generator=generator) for _ in range(count)]


def relative_error(model: torch.nn.Module, dense: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        errors = [(model(b).logits - dense(b).logits).square().mean() / dense(b).logits.square().mean()
                  for b in batches]
    return float(sum(errors) / len(errors))


def with_weights(model: torch.nn.Module, weights: dict[str, vnm.VNMWeight]) -> torch.nn.Module:
    model = copy.deepcopy(model)
    for name, weight in weights.items():
        model.get_submodule(name).weight.data = weight.to_dense()
    return model


def test_refinement_fits_the_dense_block_keeping_the_mask():
    model = tiny_llama()
    block = model.model.layers[0]
    states = [torch.randn(1, 17, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    positions = torch.arange(17)[None]
    rotary = model.model.rotary_emb(states[0], positions)
    inputs = [[[s], {"position_embeddings": rotary, "position_ids": positions}] for s in states]
    with torch.no_grad():
        targets = [block(*args, **kwargs)[0] if isinstance(block(*args, **kwargs), tuple) else block(*args, **kwargs)
                   for args, kwargs in inputs]

    pruned = copy.deepcopy(block)
    names = [n for n, mod in pruned.named_modules() if isinstance(mod, torch.nn.Linear)]
    masks = {}
    for name in names:
        weight = pruned.get_submodule(name).weight
        masks[name] = vnm.vnm_mask(weight.detach().abs(), 16, 8)
        weight.data *= masks[name]
    before = {n: p.clone() for n, p in pruned.named_parameters()}

    def error(module):
        with torch.no_grad():
            outputs = [module(*args, **kwargs) for args, kwargs in inputs]
        outputs = [o[0] if isinstance(o, tuple) else o for o in outputs]
        return sum(float((o - t).square().mean() / t.square().mean()) for o, t in zip(outputs, targets)) / len(targets)

    start = error(pruned)
    losses = refine_block(pruned, masks, inputs, targets, steps=60, lr=3e-3)
    assert len(losses) == 60 and abs(losses[0] - start) < 0.5 * start  # the first step sees the pruned block
    assert error(pruned) < 0.6 * start
    for name, parameter in pruned.named_parameters():
        assert parameter.requires_grad and parameter.grad is None
        module_name = name.rpartition(".")[0]
        if module_name in masks and name.endswith("weight"):
            assert parameter[~masks[module_name]].eq(0).all() and not torch.equal(parameter, before[name])
        else:
            assert torch.equal(parameter, before[name])  # norms and everything else stay as they were


def test_sequential_refinement_lowers_the_model_error():
    # Refinement fits the kept weights to the calibration tokens: with too few (8 x 33 here) it
    # overfits and the held-out error rises; 16 x 64 are enough.
    model, calibration, held_out = tiny_llama(), token_batches(16, 64), token_batches(4, 64, seed=2)
    config = vnm.VNMConfig(v=16, m=8, method="sparsegpt", allow_small_v=True, min_features=16)
    one_shot = compress_sequential(model, calibration, config, progress=False)
    refined = compress_sequential(model, calibration, vnm.VNMConfig(
        v=16, m=8, method="sparsegpt", allow_small_v=True, min_features=16, refine=vnm.Refinement(steps=40)),
        progress=False)
    assert set(refined) == set(one_shot)
    for name, weight in refined.items():
        assert vnm.is_vnm(weight.mask(), 16, 8)
        if name.startswith("model.layers.0."):  # later blocks see the refined blocks' outputs instead
            assert torch.equal(weight.mask(), one_shot[name].mask())
            assert not torch.equal(weight.to_dense(), one_shot[name].to_dense())
    error_one_shot = relative_error(with_weights(model, one_shot), model, held_out)
    error_refined = relative_error(with_weights(model, refined), model, held_out)
    assert error_refined < 0.85 * error_one_shot


def test_a_step_averages_its_batch():
    """A step of `batch` inputs is one Adam step on the mean of their losses, whatever order they come in."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(32, 16))
    mask = torch.rand(16, 32) > 0.5
    inputs = [[[torch.randn(5, 32)], {}] for _ in range(4)]
    targets = [torch.randn(5, 16) for _ in range(4)]
    manual = copy.deepcopy(block)
    weight = manual[0].weight
    optimizer = torch.optim.Adam([weight], lr=1e-2)
    relative = [(manual(*args) - t).square().mean() / t.square().mean() for (args, _), t in zip(inputs, targets)]
    torch.stack(relative).mean().backward()
    optimizer.step()
    losses = refine_block(block, {"0": mask}, inputs, targets, steps=1, lr=1e-2, batch=4)
    assert losses == pytest.approx([float(torch.stack(relative).mean().detach())], rel=1e-5)
    torch.testing.assert_close(block[0].weight.detach(), weight.detach() * mask, rtol=1e-5, atol=1e-6)


def test_extra_parameters_train_whole_and_the_rest_stays():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 8))
    masks = {"0": torch.rand(16, 32) > 0.5}
    inputs = [[[torch.randn(5, 32)], {}] for _ in range(4)]
    targets = [torch.randn(5, 8) for _ in range(4)]
    before = {name: p.clone() for name, p in block.named_parameters()}
    refine_block(block, masks, inputs, targets, steps=3, lr=1e-2, extra=[block[1].weight, block[1].bias])
    changed = {name for name, p in block.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"0.weight", "1.weight", "1.bias"}
    assert block[0].weight[~masks["0"]].eq(0).all() and block[1].weight.ne(0).all()  # extra ones are not masked


def test_rejects_bad_input():
    block = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inputs, targets, masks = [[[torch.randn(2, 4)], {}]], [torch.randn(2, 4)], {"0": torch.ones(4, 4, dtype=torch.bool)}
    with pytest.raises(ValueError, match="steps"):
        refine_block(block, masks, inputs, targets, steps=0, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        refine_block(block, masks, inputs, targets, steps=1, lr=0)
    with pytest.raises(ValueError, match="targets"):
        refine_block(block, masks, inputs, [], steps=1, lr=1e-3)
    with pytest.raises(ValueError, match="batch"):
        refine_block(block, masks, inputs, targets, steps=1, lr=1e-3, batch=0)
    with pytest.raises(ValueError, match="refine.batch"):
        vnm.Refinement(batch=0)
    with pytest.raises(ValueError, match="refine.steps"):
        vnm.Refinement(steps=0)
    with pytest.raises(ValueError, match="refine.lr"):
        vnm.Refinement(lr=1.5)
    with pytest.raises(ValueError, match="^refine must be"):
        vnm.VNMConfig(refine=40)
    refine = vnm.Refinement(steps=4)
    with pytest.raises(ValueError, match="refine needs the block-by-block path"):
        vnm.sparsify(torch.nn.Linear(64, 64), torch.randn(2, 64), vnm.VNMConfig(refine=refine))
    with pytest.raises(Exception, match="refine needs"):  # the backend too (Dynamo wraps the error)
        with torch.no_grad():
            torch.compile(torch.nn.Linear(64, 64), backend="vnm", options={"refine": refine})(torch.randn(2, 64))
