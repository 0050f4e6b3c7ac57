"""Recovery training: the three-staged LoRA or weight training (`vnm.finetune`) on a tiny Llama, and
`distill`."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import vnm_compile as vnm
from vnm_compile.recovery import FinetuneSchedule, distill, masked_copy
from vnm_compile.sequential import compress_sequential

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

V, M = 16, 8
CONFIG = vnm.VNMConfig(v=V, m=M, allow_small_v=True, min_features=16)
SCHEDULE = FinetuneSchedule(dense_steps=4, dynamic_steps=8, fixed_steps=6, mask_interval=2, lr=3e-2,
                            warmup_steps=2, rank=4, alpha=8, save_every=3)
VOCABULARY = 96


def _llama():
    """A tiny Llama (~0.2M parameters) with row and column counts that V and M do not all divide."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCABULARY, hidden_size=72, intermediate_size=200,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def _batches(count=6, seed=1):
    """Sequences of the first 8 tokens only: a skewed distribution that a few LoRA steps learn."""
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 8, (3, 24), generator=generator)} for _ in range(count)]


PROBE = {"input_ids": torch.arange(17)[None] * 5 % VOCABULARY}


class _Record:
    """on_step: the losses, the masks after every update and at every step, the trained model's
    logits on PROBE after the last step."""

    def __init__(self):
        self.steps, self.updates, self.logits = [], [], None

    def __call__(self, step):
        masks = {name: mask.clone() for name, mask in step.masks.items()}
        self.steps.append((step.stage, step.loss, masks))
        if step.masks_updated:
            self.updates.append(masks)
        if step.step == SCHEDULE.steps:
            with torch.no_grad():
                self.logits = step.model(**PROBE).logits


@pytest.fixture(scope="module", params=[("lora", 3e-2), ("weights", 1e-2)], ids=["lora", "weights"])
def trained(request):
    """(model, its state before, record, result, schedule) of a three-staged run of each kind."""
    kind, lr = request.param
    schedule = dataclasses.replace(SCHEDULE, trained=kind, lr=lr)
    model = _llama()
    before = copy.deepcopy(model.state_dict())
    record = _Record()
    result = vnm.finetune(model, _batches(), CONFIG, schedule, on_step=record, progress=False)
    return model, before, record, result, schedule


def test_three_stages_train_and_compress(trained):
    model, before, record, result, _ = trained
    losses = [loss for _, loss, _ in record.steps]
    assert [stage for stage, _, _ in record.steps] == ["dense"] * 4 + ["dynamic"] * 8 + ["fixed"] * 6
    assert sum(losses[-3:]) / 3 < losses[0] - 0.25  # from ln(96) towards ln(8)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    linears = {name: module for name, module in result.named_modules() if isinstance(module, vnm.VNMLinear)}
    assert len(linears) == 14 and isinstance(result.lm_head, nn.Linear)  # the blocks' linears, not the head
    untrained = {name: p for name, p in result.state_dict().items() if name.rpartition(".")[0] not in linears}
    assert untrained and all(torch.equal(p, before[name]) for name, p in untrained.items())  # norms, embeddings


def test_masks_are_vnm_change_in_stage_two_and_stay_in_stage_three(trained):
    _, _, record, _, _ = trained
    assert len(record.updates) == 4  # every 2 of the 8 dynamic steps
    for masks in record.updates:
        assert all(vnm.is_vnm(mask, V, M) for mask in masks.values())
        assert all(0.2 < mask.float().mean() <= 0.25 for mask in masks.values())
    changed = [sum(not torch.equal(a[n], b[n]) for n in a) for a, b in zip(record.updates, record.updates[1:])]
    assert all(count > 0 for count in changed)
    last_dynamic = [masks for stage, _, masks in record.steps if stage == "dynamic"][-1]
    for stage, _, masks in record.steps:
        if stage == "fixed":
            assert all(torch.equal(masks[name], last_dynamic[name]) for name in masks)


def test_compressed_model_computes_the_trained_model_under_its_final_mask(trained):
    _, _, record, result, _ = trained
    final = record.steps[-1][2]
    for name, mask in final.items():
        assert torch.equal(result.get_submodule(name).weight.mask(), mask)
    with torch.no_grad():
        torch.testing.assert_close(result(**PROBE).logits, record.logits, rtol=1e-4, atol=1e-5)


class _Interrupted(Exception):
    pass


class _FailingOnce(list):
    """Batches whose `fail_at`-th read raises once: a run killed part-way."""

    def __init__(self, batches, fail_at):
        super().__init__(batches)
        self.reads, self.fail_at = 0, fail_at

    def __getitem__(self, index):
        self.reads += 1
        if self.reads == self.fail_at:
            raise _Interrupted
        return super().__getitem__(index)


def test_resume_gives_the_uninterrupted_result(trained, tmp_path):
    model, _, _, uninterrupted, schedule = trained
    batches = _FailingOnce(_batches(), fail_at=11)  # in step 11 (dynamic): the last state saved is step 9
    with pytest.raises(_Interrupted):
        vnm.finetune(model, batches, CONFIG, schedule, checkpoint_dir=tmp_path, progress=False)
    resumed_steps = []
    resumed = vnm.finetune(model, batches, CONFIG, schedule, checkpoint_dir=tmp_path, progress=False,
                           on_step=lambda step: resumed_steps.append(step.step))
    assert resumed_steps[0] == 10
    expected = uninterrupted.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in resumed.state_dict().items())
    with pytest.raises(ValueError, match="another training run"):
        vnm.finetune(model, batches, CONFIG, FinetuneSchedule(fixed_steps=2), checkpoint_dir=tmp_path, progress=False)


def test_lora_from_a_reconstruction_keeps_its_mask_and_runs_compiled():
    model = _llama()
    batches = _batches()
    config = vnm.VNMConfig(v=V, m=M, allow_small_v=True, min_features=16, method="sparsegpt")
    start = compress_sequential(model, [{**b, "use_cache": False} for b in batches], config, progress=False)
    schedule = FinetuneSchedule(fixed_steps=3, lr=1e-2, rank=4, alpha=8)
    result = vnm.finetune(model, batches, config, schedule, progress=False)  # without start: mask chosen once
    assert all(vnm.is_vnm(m.weight.mask(), V, M) for m in result.modules() if isinstance(m, vnm.VNMLinear))
    result = vnm.finetune(model, batches, config, schedule, start=start, progress=False)
    for name, weight in start.items():
        assert torch.equal(result.get_submodule(name).weight.mask(), weight.mask())
    compiled = torch.compile(result, backend="vnm", options={"v": V, "m": M, "allow_small_v": True,
                                                             "inductor": False, "skip": ["lm_head"]})
    with torch.no_grad():
        torch.testing.assert_close(compiled(**PROBE).logits, result(**PROBE).logits, rtol=1e-4, atol=1e-5)


def test_bad_arguments_raise_clearly():
    model = _llama()
    with pytest.raises(ValueError, match="lr"):
        FinetuneSchedule(lr=(1e-3, 1e-3))
    with pytest.raises(ValueError, match="mask_interval"):
        FinetuneSchedule(mask_interval=0)
    with pytest.raises(ValueError, match="loss"):
        FinetuneSchedule(loss="mse")
    with pytest.raises(ValueError, match="trained"):
        FinetuneSchedule(trained="all")
    with pytest.raises(ValueError, match="target_modules"):
        vnm.finetune(model, _batches(), CONFIG, FinetuneSchedule(fixed_steps=1, target_modules=("*.nothing",)))
    with pytest.raises(ValueError, match="batches"):
        vnm.finetune(model, iter(_batches()), CONFIG, FinetuneSchedule(fixed_steps=1))
    with pytest.raises(TypeError, match="config"):
        vnm.finetune(model, _batches(), {"v": 16}, FinetuneSchedule(fixed_steps=1))


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(32, 64), nn.Linear(64, 32)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](torch.relu(self.layers[0](x)))


def test_distill_fits_the_whole_compressed_model_to_the_dense_one():
    torch.manual_seed(0)
    model = _TwoLayers()
    batches = [{"x": torch.randn(9, 32)} for _ in range(8)]
    weights = {name: vnm.VNMWeight.from_dense(model.get_submodule(name).weight.detach(), 16, 8)
               for name in ("layers.0", "layers.1")}
    before = {name: p.clone() for name, p in model.named_parameters()}

    def error(module):
        with torch.no_grad():
            return sum(float((module(**b) - model(**b)).square().mean()) for b in batches)

    one_shot = error(masked_copy(model, weights))
    refined, refined_weights = distill(model, weights, batches, steps=60, lr=3e-3, batch=4)
    assert error(refined) < 0.5 * one_shot
    for name, weight in refined_weights.items():
        assert torch.equal(weight.mask(), weights[name].mask())
        torch.testing.assert_close(weight.to_dense(), refined.get_submodule(name).weight.detach())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # the dense model is left alone
