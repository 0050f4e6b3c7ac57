"""End-to-end speed of whole models: a Llama-2-7B-shaped decoder and a DeiT-base-shaped ViT.

    PYTHONPATH=. python3 benchmarks/e2e.py --layers 2            # GPU; all 32 layers without --layers
    PYTHONPATH=. python3 benchmarks/e2e.py --smoke --out /tmp/e2e  # CPU dry run on tiny models

Models (random fp16 weights: speed does not need trained ones): transformers' LlamaForCausalLM with
the Llama-2-7B config, measured on prefill (batch 1 x 2048 tokens, batch 8 x 512; logits of the last
token only, as generation needs) and on decode (one token per sequence at batch 1 and 16, after a
prompt, with a static KV cache); ViTModel with the DeiT-base config at batch 1, 64 and 256, 224x224.

Variants, compared in one run: eager dense, torch.compile (Inductor) dense, backend="vnm" at
64:2:5, 64:2:6, 64:2:8, 64:2:16 (permutation search on, masks searched on the weights' RIA scores),
and torch's 2:4 semi-structured weights (`to_sparse_semi_structured`, magnitude 2:4 masks) on the
same linears under Inductor. lm_head stays dense everywhere. Compiled variants compile in
`--mode` (default "default"), and every workload is timed as the median over replays of a CUDA
graph that holds `calls` back-to-back calls of the step (the GPU's time, no Python or guard cost);
where the capture fails the step is timed with triton.testing.do_bench (the method is recorded).
`--reduce-overhead-check` also compiles inductor dense and vnm 64:2:8 with mode="reduce-overhead"
and times their decode step as users would call it (do_bench, CUDA graph trees, guards included).

Reported per (model, workload, variant): latency, throughput, speedup over Inductor dense, the
first call's time (compilation, permutation and mask search included) and the passes' seconds,
graphs compiled and graph breaks, peak GPU memory above what was allocated before the variant was built
(the user's model itself is not counted), and the bytes of the weights the variant reads.
Written to <out>/e2e-<gpu>.json, .md and .png. `--budget-s` caps each model's wall time: what does
not fit is reported as skipped, not left out silently.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import vnm_compile as vnm
from vnm_compile.backend import vnm_backend
from vnm_compile.kernels.tuning import gpu_slug
from timing import graph_us

warnings.filterwarnings("ignore", message="column_select='optimal'")
ROOT = Path(__file__).resolve().parent
PATTERNS = (5, 6, 8, 16)  # 64:2:M
VARIANTS = ["eager", "inductor", *(f"vnm-64:2:{m}" for m in PATTERNS), "semi-2:4"]
PRIORITY = ["inductor", "vnm-64:2:8", "eager", "vnm-64:2:16", "semi-2:4", "vnm-64:2:5", "vnm-64:2:6"]
DECODE_PROMPT = 256       # tokens in the KV cache before the timed decode step
DECODE_CACHE = 512        # static cache length


def log(*args: Any) -> None:
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------- models
def llama(layers: int | None, smoke: bool, device: str):
    import transformers

    if smoke:
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160,
                                          num_hidden_layers=layers or 1, num_attention_heads=4,
                                          num_key_value_heads=4, max_position_embeddings=128)
    else:  # Llama-2-7B
        config = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                          num_hidden_layers=layers or 32, num_attention_heads=32,
                                          num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(DTYPE[device]).eval()
    return model, config


UNMASKED_SDPA = "sdpa_unmasked"


def register_unmasked_sdpa() -> None:
    """SDPA attention whose mask is None when no token is padded, under torch.compile as in eager.
    transformers 5.17 builds an all-true [B, 1, S, S] mask for unpadded ViT inputs whenever it is
    traced (eager skips it); with that mask Inductor lowers SDPA to an fp32 bmm-softmax-bmm, and the
    compiled dense ViT runs 2x slower than eager. Later versions skip the mask under compile too."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def mask_unless_padded(*args, attention_mask=None, **kwargs):
        return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    AttentionInterface.register(UNMASKED_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(UNMASKED_SDPA, mask_unless_padded)


def vit(layers: int | None, smoke: bool, device: str):
    import transformers

    if smoke:
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=layers or 1,
                                        num_attention_heads=4, intermediate_size=192)
    else:  # DeiT-base: ViT-B/16 at 224x224
        config = transformers.ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=layers or 12,
                                        num_attention_heads=12, intermediate_size=3072)
    register_unmasked_sdpa()
    config._attn_implementation = UNMASKED_SDPA
    with torch.device(device):
        model = transformers.ViTModel(config, add_pooling_layer=False).to(DTYPE[device]).eval()
    return model, config


DTYPE = {"cuda": torch.float16, "cpu": torch.float32}


class Workload:
    """One measured step of a model: `make(model)` returns the step to call on that model (inputs
    prepared, a KV cache filled), `units` what one step produces (tokens or images)."""

    def __init__(self, name: str, shape: str, units: int, unit: str, make: Callable[[Callable], Callable]):
        self.name, self.shape, self.units, self.unit, self.make = name, shape, units, unit, make


def llama_workloads(model, config, smoke: bool, device: str) -> list[Workload]:
    from transformers import StaticCache

    prefill = [(1, 32), (2, 16)] if smoke else [(1, 2048), (8, 512)]
    decode = [1, 2] if smoke else [1, 16]
    prompt, cache_len = (8, 16) if smoke else (DECODE_PROMPT, DECODE_CACHE)
    generator = torch.Generator(device).manual_seed(0)
    workloads = []
    for batch, tokens in prefill:
        ids = torch.randint(1, config.vocab_size, (batch, tokens), device=device, generator=generator)
        workloads.append(Workload(f"prefill b{batch}x{tokens}", f"{batch}x{tokens}", batch * tokens, "tokens",
                                  lambda run, ids=ids: lambda: run(input_ids=ids, use_cache=False, logits_to_keep=1)))
    for batch in decode:
        prompt_ids = torch.randint(1, config.vocab_size, (batch, prompt), device=device, generator=generator)
        next_ids = torch.randint(1, config.vocab_size, (batch, 1), device=device, generator=generator)

        def make(run, batch=batch, prompt_ids=prompt_ids, next_ids=next_ids):
            cache = StaticCache(config=config, max_cache_len=cache_len)
            with torch.no_grad():  # the prompt fills the cache (eager dense: its contents do not change the timing)
                model(input_ids=prompt_ids, past_key_values=cache, use_cache=True,
                      cache_position=torch.arange(prompt, device=device))
            position = torch.tensor([prompt], device=device)
            return lambda: run(input_ids=next_ids, past_key_values=cache, use_cache=True, cache_position=position)

        workloads.append(Workload(f"decode b{batch}", f"{batch}x1 @{prompt}", batch, "tokens", make))
    return workloads


def vit_workloads(model, config, smoke: bool, device: str) -> list[Workload]:
    batches = [1, 2, 4] if smoke else [1, 64, 256]
    generator = torch.Generator(device).manual_seed(0)
    workloads = []
    for batch in batches:
        pixels = torch.randn(batch, 3, config.image_size, config.image_size, device=device, generator=generator,
                             dtype=DTYPE[device])
        workloads.append(Workload(f"b{batch}", f"{batch}x3x{config.image_size}x{config.image_size}", batch, "images",
                                  lambda run, pixels=pixels: lambda: run(pixel_values=pixels)))
    return workloads


MODELS = {"llama": (llama, llama_workloads), "vit": (vit, vit_workloads)}


# ---------------------------------------------------------------------------------------- variants
def vnm_options(m: int, smoke: bool, mode: str) -> dict:
    options = {"v": 64, "m": m, "skip": ["lm_head"], "mode": mode}
    if smoke:
        options.update(v=16, allow_small_v=True, min_features=16)
    return options


def sparse_targets(model: nn.Module) -> list[str]:
    """The linears every sparse variant converts: all but lm_head."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"]


def semi_structured(model: nn.Module) -> nn.Module:
    """A copy of `model` whose target linears hold 2:4 semi-structured weights (magnitude masks)."""
    from torch.sparse import to_sparse_semi_structured

    sparse = copy.deepcopy(model)
    for name in sparse_targets(sparse):
        module = sparse.get_submodule(name)
        weight = module.weight.detach()
        groups = weight.abs().view(weight.shape[0], -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
        module.weight = nn.Parameter(to_sparse_semi_structured(weight * keep.view_as(weight)), requires_grad=False)
    return sparse


def build(variant: str, model: nn.Module, smoke: bool, mode: str, dynamic: bool | None = None) -> tuple[Callable, nn.Module]:
    """The callable a variant runs, and the module it reads (a sparse copy for 2:4). dynamic is
    torch.compile's: None recompiles a shape that changed as a dynamic-shape graph, False
    specialises every shape (the dispatcher then reads its measured table for each)."""
    if variant == "eager":
        return model, model
    if variant == "inductor":
        return torch.compile(model, mode=mode, dynamic=dynamic), model
    if variant.startswith("vnm-"):
        m = int(variant.rsplit(":", 1)[1])
        # the backend itself, not its entry-point name: works from a checkout that is not pip-installed
        return torch.compile(model, backend=vnm_backend, options=vnm_options(m, smoke, mode), dynamic=dynamic), model
    if variant == "semi-2:4":
        if not torch.cuda.is_available():
            raise RuntimeError("torch's 2:4 semi-structured kernels need a CUDA GPU")
        sparse = semi_structured(model)
        return torch.compile(sparse, mode=mode, dynamic=dynamic), sparse
    raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")


def weight_bytes(variant: str, module: nn.Module, reports: list) -> int:
    """Bytes of the weights the variant computes with (the graph's buffers for vnm: compressed
    weights, their prefill layouts and dense copies where kept, and every parameter left dense)."""
    def nbytes(t: torch.Tensor) -> int:
        if hasattr(t, "packed"):  # semi-structured: packed values + metadata
            return sum(x.numel() * x.element_size() for x in (t.packed, t.meta) if x is not None)
        return t.numel() * t.element_size()

    total = sum(nbytes(p) for p in module.parameters())
    if variant.startswith("vnm-") and reports:
        report = reports[0]
        for layer in report.sparse_layers:
            w = layer.weight
            total += w.nbytes - layer.dense_bytes
            if report.config.keep_dense:
                total += layer.dense_bytes
            layout = report.config.prefill_layout
            if layout or (layout is None and w.device.type == "cuda"):
                total += w.out_features * 4 * w.groups * w.values.element_size()  # expanded
                total += -(-w.out_features // w.v) * 4 * w.groups * 4            # channels (int32)
    return total


# ------------------------------------------------------------------------------------------- timing
def time_step(step: Callable, units: int, device: str, mode: str) -> tuple[float, str]:
    """Median milliseconds of one call of `step` (already called twice), and how it was timed."""
    if device == "cpu":
        start = time.perf_counter()
        step()
        return 1e3 * (time.perf_counter() - start), "wall (cpu, one call)"
    from triton.testing import do_bench

    if mode == "reduce-overhead":  # replays its own CUDA graph trees, recorded by now
        return do_bench(step, warmup=25, rep=200, return_mode="median"), "do_bench (as called)"
    calls = 1 if units >= 512 else 8  # fill the graph with enough work to time
    try:
        return graph_us([step] * calls, replays=15) / 1e3, f"cuda graph of {calls} calls"
    except Exception as error:  # not capturable (a host sync, a library that allocates): time it as called
        torch.cuda.synchronize()
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        return do_bench(step, warmup=25, rep=200, return_mode="median"), f"do_bench (capture failed: {reason})"


def top_kernels(step: Callable, steps: int = 3, top: int = 12) -> list[dict]:
    """Where one step's GPU time goes: the kernels with the most device time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [{"name": e.key[:100], "us_per_step": e.self_device_time_total / steps, "calls_per_step": e.count / steps}
            for e in events[:top]]


def run_variant(variant: str, model: nn.Module, workloads: list[Workload], smoke: bool, mode: str,
                device: str, deadline: float, dynamic: bool | None = None) -> list[dict]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        # what this variant adds: the user's model (and whatever earlier variants left) is already there
        baseline = torch.cuda.memory_allocated()
    reports_before = vnm.reports()  # held, so that their ids stay theirs
    rows = []
    try:
        run, module = build(variant, model, smoke, mode, dynamic)
    except Exception as error:
        return [dict(variant=variant, workload=w.name, error=f"{type(error).__name__}: {error}"[:400]) for w in workloads]
    for workload in workloads:
        row = dict(variant=variant, workload=workload.name, shape=workload.shape)
        if time.monotonic() > deadline:
            rows.append({**row, "skipped": "time budget"})
            continue
        try:
            with torch.no_grad():
                step = workload.make(run)
                start = time.perf_counter()
                step()
                if device == "cuda":
                    torch.cuda.synchronize()
                row["first_call_s"] = time.perf_counter() - start
                step()  # the second call: Dynamo's recompile for a dynamic shape, CUDA graph trees' recording
                ms, method = time_step(step, workload.units, device, mode)
                row.update(latency_ms=ms, throughput=workload.units / ms * 1e3, unit=f"{workload.unit}/s", timing=method)
                if device == "cuda":
                    row["kernels"] = top_kernels(step)
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"[:400]
            log(f"  {variant} {workload.name}: {row['error']}")
        rows.append(row)
    seen = {id(report) for report in reports_before}
    reports = [r for r in vnm.reports() if id(r) not in seen] if variant.startswith("vnm-") else []
    common = dict(graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
                  weight_bytes=weight_bytes(variant, module, reports))
    if device == "cuda":
        common["peak_mem_GB"] = (torch.cuda.max_memory_allocated() - baseline) / 1e9
    if reports:
        seconds: dict[str, float] = {}
        for report in reports:
            for stage, s in report.seconds.items():
                seconds[stage] = seconds.get(stage, 0.0) + s
        common["passes_s"] = seconds
        common["sparse_linears"] = len(reports[0].sparse_layers)
        common["retained"] = reports[0].retained()
    for row in rows:
        row.update(common)
    del run, module
    return rows


def reduce_overhead_rows(model, workloads, smoke, device, deadline) -> list[dict]:
    """Decode steps of inductor dense and vnm 64:2:8 compiled with mode="reduce-overhead" (CUDA graph
    trees), timed as called."""
    decode = [w for w in workloads if w.name.startswith("decode")]
    return [{**row, "variant": f"{variant} (reduce-overhead, as called)"}
            for variant in ("inductor", "vnm-64:2:8")
            for row in run_variant(variant, model, decode, smoke, "reduce-overhead", device, deadline)]


# ----------------------------------------------------------------------------------------- reports
def add_speedups(rows: list[dict]) -> None:
    base = {row["workload"]: row["latency_ms"] for row in rows if row["variant"] == "inductor" and "latency_ms" in row}
    for row in rows:
        if "latency_ms" in row and row["workload"] in base:
            row["speedup_vs_inductor"] = base[row["workload"]] / row["latency_ms"]


def markdown(result: dict) -> str:
    lines = [f"# End-to-end speed on {result['device']}", "",
             f"{result['date']}; torch {result['torch']}, triton {result['triton']}, transformers "
             f"{result['transformers']}; random weights; mode={result['args']['mode']}, "
             f"dynamic={result['args'].get('dynamic', 'auto')}. Latency: "
             "median over CUDA-graph replays of the step (GPU time), unless the timing column says otherwise. "
             "first call: compilation (passes, permutation and mask search, Inductor, autotuning) plus one run.", ""]
    for name, model in result["models"].items():
        lines += [f"## {name}: {model['description']}", "",
                  "| workload | variant | latency ms | throughput | x inductor | first call s | permute s | "
                  "graphs | breaks | peak GB added | weight MB | timing |", "|" + "---|" * 12]
        for row in model["rows"]:
            if "latency_ms" not in row:
                why = row.get("error") or f"skipped: {row.get('skipped')}"
                lines.append(f"| {row['workload']} | {row['variant']} | {why} |" + " |" * 9)
                continue
            permute = row.get("passes_s", {}).get("permute")
            lines.append(
                f"| {row['workload']} | {row['variant']} | {row['latency_ms']:.3f} | {row['throughput']:,.0f} "
                f"{row['unit']} | {_fmt(row.get('speedup_vs_inductor'), '.2f')} | {_fmt(row.get('first_call_s'), '.1f')} | "
                f"{_fmt(permute, '.1f')} | {row.get('graphs', '')} | {row.get('graph_breaks', '')} | "
                f"{_fmt(row.get('peak_mem_GB'), '.2f')} | {_fmt(row.get('weight_bytes', 0) / 1e6, '.1f')} | "
                f"{row['timing']} |")
        lines.append("")
        profiled = [row for row in model["rows"] if row.get("kernels") and row["variant"] in ("inductor", "vnm-64:2:8")]
        if profiled:
            lines += ["Where the GPU time goes (torch.profiler, us per step, top kernels):", ""]
            for row in profiled:
                top = "; ".join(f"{k['name'][:60]} {k['us_per_step']:.0f}" for k in row["kernels"][:6])
                lines.append(f"- {row['workload']}, {row['variant']}: {top}")
            lines.append("")
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items()):
        rows = [r for r in model["rows"] if "latency_ms" in r and "reduce-overhead" not in r["variant"]]
        workloads = list(dict.fromkeys(r["workload"] for r in rows))
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
        baseline = "inductor" if "inductor" in variants else variants[0] if variants else None
        base = {r["workload"]: r["latency_ms"] for r in rows if r["variant"] == baseline}
        width = 0.8 / max(1, len(variants))
        for i, variant in enumerate(variants):
            heights = [next((base[w] / r["latency_ms"] for r in rows if r["variant"] == variant and r["workload"] == w
                             and w in base), 0.0) for w in workloads]
            ax.bar([j + i * width for j in range(len(workloads))], heights, width, label=variant)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(workloads))], workloads)
        ax.set_ylabel(f"speedup over {baseline} (dense)")
        ax.set_title(f"{name} ({model['description']})", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"End-to-end speed, {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llama,vit", help="comma-separated, of " + ",".join(MODELS))
    parser.add_argument("--layers", type=int, default=None, help="Llama layers (default 32; smoke 1)")
    parser.add_argument("--vit-layers", type=int, default=None, help="ViT layers (default 12; smoke 1)")
    parser.add_argument("--variants", default=",".join(PRIORITY), help="comma-separated, run in this order")
    parser.add_argument("--mode", default="default", help="torch.compile mode of the compiled variants")
    parser.add_argument("--dynamic", choices=("auto", "static"), default="auto",
                        help="auto: a changed shape recompiles as a dynamic-shape graph; static: one graph per shape")
    parser.add_argument("--workloads", default="", help='comma-separated names, e.g. "decode b1,decode b16,b256" (default: all)')
    parser.add_argument("--budget-s", default="", help="per model wall-clock seconds, comma-separated")
    parser.add_argument("--reduce-overhead-check", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [m for m in models if m not in MODELS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown models or variants {unknown}; models: {list(MODELS)}, variants: {VARIANTS}")
    budgets = [float(b) for b in args.budget_s.split(",") if b] or [math.inf]
    budgets += [budgets[-1]] * len(models)
    import transformers
    import triton

    transformers.logging.set_verbosity_error()
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'cpu'})"
    result = {"device": device_name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
              "args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    stem = args.out / f"e2e-{gpu_slug(device_name) if device == 'cuda' else 'cpu'}"
    for name, budget in zip(models, budgets):
        deadline = time.monotonic() + budget
        build_model, make_workloads = MODELS[name]
        layers = args.layers if name == "llama" else args.vit_layers
        torch.manual_seed(0)
        model, config = build_model(layers, args.smoke, device)
        workloads = make_workloads(model, config, args.smoke, device)
        if args.workloads:
            workloads = [w for w in workloads if w.name in args.workloads.split(",")]
        if not workloads:
            log(f"{name}: none of --workloads {args.workloads!r} is one of its workloads; skipped")
            del model
            continue
        description = (f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                       f"intermediate {config.intermediate_size}, {DTYPE[device]}".replace("torch.", ""))
        log(f"{name}: {description}")
        rows: list[dict] = []
        order = {v: i for i, v in enumerate(VARIANTS)}

        def publish(rows=rows, name=name, description=description, workloads=workloads):
            add_speedups(rows)
            rows.sort(key=lambda r: ([w.name for w in workloads].index(r["workload"]), order.get(r["variant"], 99)))
            result["models"][name] = {"description": description, "rows": rows}
            write(result, stem)

        for variant in variants:
            if time.monotonic() > deadline:
                rows += [dict(variant=variant, workload=w.name, skipped="time budget") for w in workloads]
                continue
            start = time.monotonic()
            rows += run_variant(variant, model, workloads, args.smoke, args.mode, device, deadline,
                                None if args.dynamic == "auto" else False)
            log(f"  {variant}: {time.monotonic() - start:.0f} s")
            publish()  # a run cut short still leaves what it measured
        if args.reduce_overhead_check and name == "llama" and device == "cuda":
            rows += reduce_overhead_rows(model, workloads, args.smoke, device, deadline)
        publish()
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    write(result, stem)
    try:
        chart(result, stem.with_suffix(".png"))
    except ImportError:
        log("matplotlib is not installed: no chart")
    log(markdown(result))
    return result


def write(result: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main(sys.argv[1:])
