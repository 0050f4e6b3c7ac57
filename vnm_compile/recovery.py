"""Recovery training of V:N:M models: the three-staged LoRA of the V:N:M paper, and end-to-end distillation.

`finetune` trains LoRA adapters (PEFT) on the model's block linears, or their own weights, in three
stages:
  1. dense:   LoRA on the dense model (no mask);
  2. dynamic: LoRA under V:N:M masks recomputed every `mask_interval` steps from the importance
              (config.criterion) of the merged weight W + s B A, with the activation norms of the
              inputs of the step that recomputes them;
  3. fixed:   LoRA under the last mask of stage 2 (or, without stage 2, a mask chosen once at its
              start, or the starting mask of a reconstructed model);
then merges the adapters and compresses each trained linear under its final mask into a VNMLinear.
In stages 2 and 3 the mask applies to the merged weight (`lora.MaskedLoraLinear`, or
`lora.MaskedLinear` when the weights train themselves), so the compressed model computes exactly what
was trained. Training state (trained parameters, optimizer, step, masks, random state) is saved to a
directory as it goes, and a call given that directory resumes where it stopped.

`distill` is the post-training alternative: with the masks fixed, the kept weights of an already
compressed model (`compress_sequential`) are trained on the whole model towards the dense model's
output, by `refine_block`.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .compression import choose_mask, pruned
from .config import VNMConfig
from .format import VNMWeight
from .modules import replace_linears
from .refine import refine_block
from .scoring import ActivationNorms, importance
from .sequential import block_linears

log = logging.getLogger(__name__)

STAGES = ("dense", "dynamic", "fixed")
LOSSES = ("lm", "distill")
TRAINED = ("lora", "weights")
AUTOCAST_DTYPES = (None, "bfloat16", "float16")
CHECKPOINT = "finetune.pt"


def _check_count(name: str, value: Any, smallest: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < smallest:
        raise ValueError(f"{name} must be an integer >= {smallest}, got {value!r}")


@dataclass(frozen=True)
class FinetuneSchedule:
    """How `finetune` trains. Steps are optimizer steps of `grad_accumulation` batches each.

    dense_steps, dynamic_steps, fixed_steps: the lengths of the three stages (any may be 0).
    mask_interval: steps between mask updates in the dynamic stage (the paper: 20).
    lr: the peak learning rate, one for all stages or one per stage; it warms up linearly over the
    first `warmup_steps` steps of the run and decays to zero along a cosine over the whole run.
    trained: "lora", adapters of `rank` and `alpha` (the adapter's scale is alpha / rank) merged at the
    end; "weights", the linears' own weights (their kept entries under a mask: every parameter of
    the linear, at the memory of a full fine-tune of those layers).
    target_modules: glob patterns of the module names that get adapters (and masks), among the
    linears inside the model's repeated blocks that `config` keeps eligible; empty: all of them.
    loss: "lm", the next-token cross-entropy of the batch's input_ids (or its labels); "distill",
    the KL divergence from the teacher's next-token distribution (the dense model's by default).
    autocast: None, "bfloat16" or "float16": the dtype of torch.autocast around the forward passes.
    device: where training runs (default: where the model is).
    seed: the adapters' initialisation and the order of the batches.
    save_every: steps between checkpoints, when a checkpoint directory is given.
    """

    dense_steps: int = 0
    dynamic_steps: int = 0
    fixed_steps: int = 0
    mask_interval: int = 20
    lr: float | tuple[float, float, float] = 2e-4
    warmup_steps: int = 0
    trained: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    target_modules: tuple[str, ...] = ()
    grad_accumulation: int = 1
    loss: str = "lm"
    weight_decay: float = 0.0
    autocast: str | None = None
    device: str | None = None
    seed: int = 0
    save_every: int = 50

    def __post_init__(self) -> None:
        for name in ("dense_steps", "dynamic_steps", "fixed_steps", "warmup_steps", "seed"):
            _check_count(name, getattr(self, name))
        for name in ("mask_interval", "rank", "grad_accumulation", "save_every"):
            _check_count(name, getattr(self, name), 1)
        lrs = (self.lr,) * 3 if isinstance(self.lr, (int, float)) else tuple(self.lr)
        valid = all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in lrs)
        if len(lrs) != 3 or not valid:
            raise ValueError(f"lr must be a learning rate in [0, 1) or one per stage (three), got {self.lr!r}")
        object.__setattr__(self, "lr", tuple(float(x) for x in lrs))
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a non-negative number, got {self.weight_decay!r}")
        patterns = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
        if not isinstance(patterns, (tuple, list)) or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"target_modules must be a list of glob patterns, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", tuple(patterns))
        if self.trained not in TRAINED:
            raise ValueError(f"trained must be one of {TRAINED}, got {self.trained!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be one of {AUTOCAST_DTYPES}, got {self.autocast!r}")
        if self.device is not None:
            torch.device(self.device)  # raises on a malformed device string

    @property
    def steps(self) -> int:
        return self.dense_steps + self.dynamic_steps + self.fixed_steps

    def stage(self, step: int) -> str:
        """The stage that step (0-based) belongs to."""
        if step < self.dense_steps:
            return "dense"
        return "dynamic" if step < self.dense_steps + self.dynamic_steps else "fixed"

    def learning_rate(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        decay = 0.5 * (1 + math.cos(math.pi * step / self.steps))
        return self.lr[STAGES.index(self.stage(step))] * warmup * decay

    def updates_masks(self, step: int) -> bool:
        """Whether the masks are recomputed before step (0-based): every mask_interval steps of stage 2."""
        return self.stage(step) == "dynamic" and (step - self.dense_steps) % self.mask_interval == 0


@dataclass
class Step:
    """What `finetune` reports to `on_step` after each optimizer step. masks and model are the live
    objects (copy a mask to keep it); model is the model under training (the PEFT model for LoRA)."""

    step: int  # steps done, 1-based
    stage: str
    loss: float
    lr: float
    masks_updated: bool
    masks: dict[str, torch.Tensor]
    model: nn.Module


def finetune(
    model: nn.Module,
    batches: Sequence,
    config: VNMConfig,
    schedule: FinetuneSchedule | None = None,
    *,
    start: dict[str, VNMWeight] | None = None,
    teacher: nn.Module | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    on_step: Callable[[Step], None] | None = None,
    progress: bool = True,
) -> nn.Module:
    """A copy of `model` recovered by the three-staged training of `schedule` (LoRA, or the weights
    themselves), its trained linears replaced by VNMLinear modules (V:N:M at config.v, config.m) that
    hold the merged weights.

    model: a transformers causal LM (or any model whose output has .logits, and .loss given labels).
    batches: a sequence of batches, each a dict of the model's keyword arguments with input_ids
    [batch, tokens] (or an input_ids tensor); steps draw them in a seeded shuffled order, epoch
    after epoch. start: compressed weights by module name (`compress_sequential`'s result): the
    copy starts from them (their dense values) and from their masks, and they name the trained
    linears. teacher: the model whose outputs the "distill" loss matches (default: `model`).
    checkpoint_dir: where the training state is saved every schedule.save_every steps and at the
    end; a call whose directory holds a state of the same model, config and schedule resumes it.
    The model is not modified. The masks follow config's v, m, criterion, a and column_select;
    channel permutations are not searched here (fold them into the model first, as
    `sparsify(..., config with sparsify=False)` does).
    """
    schedule = FinetuneSchedule() if schedule is None else schedule
    if not isinstance(config, VNMConfig):
        raise TypeError(f"config must be a VNMConfig, got {type(config).__name__}")
    if config.pattern != "vnm":
        raise ValueError(f"finetune makes V:N:M layers: config.pattern must be 'vnm', got {config.pattern!r}")
    if not isinstance(schedule, FinetuneSchedule):
        raise TypeError(f"schedule must be a FinetuneSchedule, got {type(schedule).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not hasattr(batches, "__len__") or not hasattr(batches, "__getitem__") or not len(batches):
        raise ValueError("batches must be a non-empty sequence (a list of batches): resuming and the seeded "
                         "order index into it")
    device = torch.device(schedule.device) if schedule.device else next(model.parameters()).device
    student = copy.deepcopy(model).to(device)
    targets = _targets(student, config, schedule, start)
    masks = {name: weight.mask().to(device) for name, weight in (start or {}).items()}
    if start:
        with torch.no_grad():
            for name, weight in start.items():
                student.get_submodule(name).weight.copy_(weight.to_dense())
    if schedule.loss == "distill":
        if teacher is None and start is None and schedule.dense_steps:
            log.warning("the dense stage distils the model into itself: its loss and gradients are zero, so its "
                        "%d steps change nothing", schedule.dense_steps)
        teacher = model if teacher is None else teacher
        if next(teacher.parameters()).device != device:
            teacher = copy.deepcopy(teacher).to(device)
    _without_cache(student)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(schedule.seed)
        trainee, inner, merge = _trainable(student, targets, schedule)
        layers = {name: inner.get_submodule(name) for name in targets}
        trained = {name: p for name, p in trainee.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(trained.values(), lr=schedule.lr[0], weight_decay=schedule.weight_decay)
        fingerprint = _fingerprint(config, schedule, targets)
        step = 0
        if checkpoint_dir is not None:
            step, masks = _restore(Path(checkpoint_dir), fingerprint, trained, optimizer, masks, device)
        order = _BatchOrder(batches, schedule)
        trainee.train()
        bar = tqdm(total=schedule.steps, initial=step, desc="finetune", disable=not progress)
        while step < schedule.steps:
            stage = schedule.stage(step)
            micro_batches = [_on(order[step * schedule.grad_accumulation + i], device)
                             for i in range(schedule.grad_accumulation)]
            updated = schedule.updates_masks(step) or (stage == "fixed" and not masks)
            if updated:
                masks = _choose_masks(inner, layers, micro_batches, config, schedule)
            for name, layer in layers.items():
                layer.vnm_mask = None if stage == "dense" else masks[name]
            lr = schedule.learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = 0.0
            for batch in micro_batches:
                with _autocast(device, schedule):
                    value = _loss(trainee, batch, schedule.loss, teacher) / len(micro_batches)
                value.backward()
                loss += value.item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            bar.set_postfix(stage=stage, loss=f"{loss:.4f}")
            if on_step is not None:
                on_step(Step(step, stage, loss, lr, updated, masks, trainee))
            if checkpoint_dir is not None and (step % schedule.save_every == 0 or step == schedule.steps):
                _save(Path(checkpoint_dir), fingerprint, step, trained, optimizer, masks, device)
        bar.close()
    if not masks:  # no stage ran under a mask: choose it once, from the trained merged weights
        masks = _choose_masks(inner, layers, [_on(order[0], device)], config, schedule)
    merged = merge()
    weights = {name: pruned(merged.get_submodule(name).weight.detach(), masks[name], config) for name in targets}
    replace_linears(merged, weights)
    _without_cache(merged, restore=model)
    return merged.eval()


def _targets(model: nn.Module, config: VNMConfig, schedule: FinetuneSchedule,
             start: dict[str, VNMWeight] | None) -> list[str]:
    """The names of the linears that get adapters: start's, else the eligible block linears that
    match schedule.target_modules (all of them when it is empty)."""
    if start:
        names = list(start)
        for name, weight in start.items():
            if not isinstance(weight, VNMWeight) or (weight.v, weight.m) != (config.v, config.m):
                raise ValueError(f"start[{name!r}] must be a VNMWeight at {config.v}:2:{config.m}")
    else:
        names = [name for name in block_linears(model, config)
                 if not schedule.target_modules
                 or any(fnmatch.fnmatchcase(name, p) for p in schedule.target_modules)]
    if not names:
        raise ValueError("no linear to train: none inside the model's blocks matches schedule.target_modules "
                         f"{list(schedule.target_modules)} and config")
    for name in names:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise ValueError(f"{name} is a {type(module).__name__}; finetune trains nn.Linear layers only")
        if start and start[name].shape != module.weight.shape:
            raise ValueError(f"start[{name!r}] is {tuple(start[name].shape)}, the linear {tuple(module.weight.shape)}")
    return names


def _trainable(student: nn.Module, targets: list[str],
               schedule: FinetuneSchedule) -> tuple[nn.Module, nn.Module, Callable[[], nn.Module]]:
    """(the model to train, the model whose `targets` are the masked trainable linears, a function
    giving the trained model free of adapters, each target's weight its merged weight): PEFT's model
    around `student`, `student` inside it and PEFT's merge for LoRA; for "weights", `student`, whose
    targets' weights are the only parameters that train and need no merge."""
    from peft import get_peft_model

    from .lora import MaskedLinear, masked_lora_config

    if schedule.trained == "lora":
        peft_model = get_peft_model(student, masked_lora_config(
            r=schedule.rank, lora_alpha=schedule.alpha, lora_dropout=0.0, target_modules=targets))
        return peft_model, peft_model.base_model.model, peft_model.merge_and_unload
    student.requires_grad_(False)
    for name in targets:
        parent, _, leaf = name.rpartition(".")
        layer = MaskedLinear.sharing(student.get_submodule(name))
        layer.weight.requires_grad_(True)
        setattr(student.get_submodule(parent), leaf, layer)
    return student, student, lambda: student


def _choose_masks(model: nn.Module, layers: dict[str, nn.Module], batches: list[dict], config: VNMConfig,
                  schedule: FinetuneSchedule) -> dict[str, torch.Tensor]:
    """V:N:M masks from the importance of each layer's merged weight (W + s B A, or W); the activation
    norms (for criteria that read them) are those of `batches`' inputs to each layer."""
    norms = {}
    if config.criterion != "abs":
        with torch.no_grad(), ActivationNorms(model, tuple({type(layer) for layer in layers.values()})) as statistics:
            for batch in batches:
                with _autocast(next(model.parameters()).device, schedule):
                    model(**batch)
        norms = statistics.norms()
    masks = {}
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.merged_weight()
            scores = importance(weight, config.criterion, norms.get(name), config.ria_exponent)
            masks[name] = choose_mask(scores, config)
    return masks


def _loss(model: nn.Module, batch: dict, kind: str, teacher: nn.Module | None) -> torch.Tensor:
    if kind == "lm":
        labels = batch.get("labels", batch["input_ids"])
        return model(**{**batch, "labels": labels}).loss
    logits = model(**batch).logits
    with torch.no_grad():
        target = teacher(**batch).logits
    vocabulary = logits.shape[-1]
    return F.kl_div(F.log_softmax(logits.float().reshape(-1, vocabulary), -1),
                    F.log_softmax(target.float().reshape(-1, vocabulary), -1), log_target=True, reduction="batchmean")


def _autocast(device: torch.device, schedule: FinetuneSchedule):
    dtype = getattr(torch, schedule.autocast) if schedule.autocast else None
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _without_cache(model: nn.Module, restore: nn.Module | None = None) -> None:
    """Training builds no key/value cache (transformers' config.use_cache); restore: set it back as
    in that model."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        restored = getattr(getattr(restore, "config", None), "use_cache", True)
        config.use_cache = restored if restore is not None else False


def _on(batch: Any, device: torch.device) -> dict:
    batch = batch if isinstance(batch, dict) else {"input_ids": batch}
    if "input_ids" not in batch:
        raise ValueError(f"each batch needs input_ids, got keys {sorted(batch)}")
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


class _BatchOrder:
    """The batch of each micro-step: epoch after epoch through `batches`, each epoch in an order
    shuffled by (seed, epoch), so that any micro-step's batch is known without replaying the run."""

    def __init__(self, batches: Sequence, schedule: FinetuneSchedule):
        self.batches, self.seed = batches, schedule.seed
        self.epoch, self.order = -1, []

    def __getitem__(self, index: int) -> Any:
        epoch, position = divmod(index, len(self.batches))
        if epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.epoch, self.order = epoch, torch.randperm(len(self.batches), generator=generator).tolist()
        return self.batches[self.order[position]]


def _fingerprint(config: VNMConfig, schedule: FinetuneSchedule, targets: list[str]) -> str:
    """What a saved state must have been trained with to be resumed (not where, nor how often saved)."""
    plan = {k: v for k, v in dataclasses.asdict(schedule).items() if k not in ("device", "save_every")}
    return json.dumps({"config": dataclasses.asdict(config), "schedule": plan, "targets": targets}, sort_keys=True)


def _save(directory: Path, fingerprint: str, step: int, trained: dict[str, nn.Parameter],
          optimizer: torch.optim.Optimizer, masks: dict[str, torch.Tensor], device: torch.device) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": fingerprint, "step": step, "masks": masks, "optimizer": optimizer.state_dict(),
             "trained": {name: p.detach() for name, p in trained.items()}, "rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    temporary = directory / (CHECKPOINT + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, directory / CHECKPOINT)  # a crash while saving leaves the previous state whole


def _restore(directory: Path, fingerprint: str, trained: dict[str, nn.Parameter],
             optimizer: torch.optim.Optimizer, masks: dict[str, torch.Tensor],
             device: torch.device) -> tuple[int, dict[str, torch.Tensor]]:
    """(step, masks) of the state saved in directory, loaded into the adapters and the optimizer;
    (0, masks) when there is none."""
    path = directory / CHECKPOINT
    if not path.exists():
        return 0, masks
    state = torch.load(path, map_location=device, weights_only=True)
    if state["fingerprint"] != fingerprint:
        raise ValueError(f"{path} holds the state of another training run (other model layers, config or "
                         "schedule); pass an empty checkpoint_dir to start afresh")
    with torch.no_grad():
        for name, parameter in trained.items():
            parameter.copy_(state["trained"][name])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"].cpu())
    if "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    return state["step"], state["masks"]


class FirstOutput(nn.Module):
    """The model with its first output only (last_hidden_state, logits): what `distill` matches."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **kwargs: Any) -> torch.Tensor:
        output = self.model(**kwargs)
        return output if isinstance(output, torch.Tensor) else output[0]


def masked_copy(model: nn.Module, weights: dict[str, VNMWeight]) -> nn.Module:
    """A copy of the model whose named linears hold their compressed weights in dense form (zero where
    pruned): what the V:N:M op computes, as plain linears."""
    model = copy.deepcopy(model)
    for name, weight in weights.items():
        model.get_submodule(name).weight.data = weight.to_dense()
    return model


def distill(
    model: nn.Module,
    weights: dict[str, VNMWeight],
    batches: Sequence[dict],
    steps: int,
    lr: float,
    batch: int = 1,
    output: Callable[[nn.Module], nn.Module] = FirstOutput,
    train_affine: bool = False,
) -> tuple[nn.Module, dict[str, VNMWeight]]:
    """End-to-end refinement after block-wise compression: the compressed model's kept weights,
    masks fixed, trained by `refine_block` on the whole model towards the dense `model`'s output
    (post-training, no labels) on `batches` (dicts of keyword arguments), `batch` of them a step.
    output wraps a model into what is matched (default its first output: last hidden state or
    logits). train_affine trains every one-dimensional parameter too (biases, norm scales and
    shifts). Returns the refined copy (masked dense linears, and the trained one-dimensional
    parameters) and its compressed weights."""
    student = output(masked_copy(model, weights))
    with torch.no_grad():
        targets = [output(model)(**inputs) for inputs in batches]
    masks = {f"model.{name}": weight.mask() for name, weight in weights.items()}
    extra = [p for p in student.parameters() if p.dim() == 1] if train_affine else []
    refine_block(student, masks, [[[], inputs] for inputs in batches], targets, steps, lr, batch, extra=extra)
    refined = {name: VNMWeight.from_dense(student.model.get_submodule(name).weight.detach(), w.v, w.m,
                                          mask=masks[f"model.{name}"]) for name, w in weights.items()}
    return student.model, refined
