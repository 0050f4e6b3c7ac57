"""End-to-end speed of a Llama-2-7B-shaped model in the flow users run.

    python3 -m benchmarks.e2e                          # GPU: 32 layers, every variant
    python3 -m benchmarks.e2e --layers 8 --out $OUT    # fewer layers: a shorter run
    python3 -m benchmarks.e2e --smoke --out /tmp/e2e   # CPU dry run on a tiny model
    python3 -m benchmarks.e2e --variants vnm-64:2:8 --append results/e2e-<gpu>.json   # add to an earlier run
    python3 -m benchmarks.e2e --shapes "" --batches 1 --profile   # generate() alone, and where its steps go
    python3 -m benchmarks.e2e --shapes 1x1 --generate "" --profile   # one decode call, and where its CPU goes

Model: transformers' LlamaForCausalLM with the Llama-2-7B config (random fp16 weights: speed does
not need trained ones), lm_head dense everywhere. Variants, in one run: Inductor dense
(`torch.compile(model)`), `backend="vnm"` at 64:2:8 and 64:2:16 (RIA masks, no permutation search:
random weights give it nothing to find, and the speed does not depend on it), and torch's 2:4
(`to_sparse_semi_structured`, i.e. cuSPARSELt) under Inductor.

1. The one-compile flow: each variant is compiled once (default mode) and called with the shapes a
   server sees, in order: a prompt (1 x 2048, no KV cache, logits of the last token), then 16 x 1
   (Dynamo's dynamic-shape graph; vnm runs this count in its bucket's graph, `small_tokens`),
   1 x 1 (torch specialises a size of 1), 12 x 1 (another decode batch: the graph 16 x 1 compiled
   serves it, for vnm its bucket's), and another prompt, 1 x 512 (the dynamic graph). Per shape:
   the wall time per call as called (do_bench: guards, Python, launches) and the GPU time of the same
   call replayed in a CUDA graph; from torch.profiler, where a call's CPU time goes (the compiled
   region, Dynamo's guards, the kernel launches) and for vnm the CPU time per sparse linear call where
   it is dispatched per call (the dynamic graph). With --profile, each shape's profiler table and
   Python's own profile (cProfile) of its calls.
2. generate() as transformers compiles it for a static KV cache (`CompileConfig`: the decode step
   compiled in mode="reduce-overhead", the prompt run as it is), greedy, prompt 256 -> 128 new tokens at
   batch 1 and 16: tokens per second, from the median of three timed generate() calls. With
   --profile, one more generate() under torch.profiler: per decode step, the compiled graph's GPU
   time (the V:N:M kernels' share) and the CPU time of Dynamo's guards and of the graph's launch.
Every first call (the one that compiles) records its seconds, vnm's passes in them, and in the JSON
the compile phases that took at least COMPILE_PHASE_FLOOR seconds (torch's own compile timers).
Ratios are against Inductor dense and torch's 2:4 of the same run. Results: <out>/e2e-<gpu>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import functools
import io
import json
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vnm_compile
from benchmarks.timing import device_record, graph_us, log, write_results

ROOT = Path(__file__).resolve().parent
VARIANTS = ("inductor", "vnm-64:2:8", "vnm-64:2:16", "semi-2:4")
FLOW = ((1, 2048), (16, 1), (1, 1), (12, 1), (1, 512))
SMOKE_FLOW = ((1, 64), (4, 1), (1, 1), (3, 1), (1, 32))
PROFILED_CALLS = 10
GUARDS_EVENT = "TorchDynamo Cache Lookup"
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
PROMPT, NEW_TOKENS = 256, 128
GENERATE_REPEATS = 3
COMPILE_PHASE_FLOOR = 0.5  # seconds: the compile phases a first call records


def llama(layers: int, smoke: bool, device: str) -> nn.Module:
    import transformers

    if smoke:
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    else:  # Llama-2-7B
        config = transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                          num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                                          max_position_embeddings=4096, rms_norm_eps=1e-5)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(config).to(torch.float16 if device == "cuda" else torch.float32).eval()


def vnm_options(m: int, smoke: bool, mode: str) -> dict:
    options = {"v": 64, "m": m, "skip": ["lm_head"], "permute": False, "mode": mode}
    if smoke:
        options.update(v=16, allow_small_v=True, min_features=16)
    return options


def semi_structured(model: nn.Module) -> nn.Module:
    """A copy of `model` whose linears but lm_head hold 2:4 semi-structured weights (magnitude masks)."""
    from torch.sparse import to_sparse_semi_structured

    sparse = copy.deepcopy(model)
    for name, module in sparse.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            weight = module.weight.detach()
            groups = weight.abs().view(weight.shape[0], -1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
            module.weight = nn.Parameter(to_sparse_semi_structured(weight * keep.view_as(weight)), requires_grad=False)
    return sparse


def compiled(variant: str, model: nn.Module, smoke: bool, mode: str, dynamic: bool | None = None) -> Callable:
    """The model compiled as the variant compiles it (dynamic=False: a static graph per shape)."""
    if variant.startswith("vnm-"):
        options = vnm_options(int(variant.rsplit(":", 1)[1]), smoke, mode)
        return torch.compile(model, backend="vnm", options=options, dynamic=dynamic)
    return torch.compile(model, mode=mode, dynamic=dynamic)


def call_profile(step: Callable, path: Path | None) -> dict:
    """Where the CPU time of a call as called goes, per call of `step` (PROFILED_CALLS calls under
    torch.profiler): the CPU ms inside the compiled region (Inductor's code with the backend's
    wrappers), of Dynamo's guards, the kernel launches, and the CPU us of one per-call sparse linear
    (vnm.linear_dispatched, the dynamic graph's; None where the graph has none). With `path`, the
    profiler's table and Python's own profile of as many more calls (cProfile, by self time) go there."""

    def calls() -> None:
        for _ in range(PROFILED_CALLS):
            step()

    events = _profiled(calls)
    per_call = lambda keys: sum(e.cpu_time_total for e in events if e.key.startswith(keys)) / PROFILED_CALLS / 1e3
    dispatched = [e for e in events if e.key == "vnm::linear_dispatched"]
    if path is not None:
        python = cProfile.Profile()
        python.runcall(calls)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        stats = io.StringIO()
        pstats.Stats(python, stream=stats).sort_stats("tottime").print_stats(30)
        path.write_text(events.table(sort_by="self_cpu_time_total", row_limit=30)
                        + f"\n\nPython by self time, {PROFILED_CALLS} calls (cProfile)\n" + stats.getvalue())
    return dict(region_cpu_ms=per_call("Torch-Compiled Region"), guards_cpu_ms=per_call(GUARDS_EVENT),
                launches=sum(e.count for e in events if e.key in LAUNCHES) / PROFILED_CALLS,
                sparse_linear_cpu_us=dispatched[0].cpu_time_total / dispatched[0].count if dispatched else None)


def flow(variant: str, model: nn.Module, shapes, smoke: bool, device: str, static_reference: bool,
         profile_stem: Path | None = None) -> list[dict]:
    """One compile, then the shapes in order: wall ms as called, CUDA-graph ms, first call s, where a
    call's CPU time goes (`call_profile`: on CUDA, or wherever `profile_stem` names files for its
    tables, <profile_stem>-<variant>-<shape>.txt); with `static_reference`, the CUDA-graph ms of each
    shape compiled on its own (dynamic=False)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run = compiled(variant, model, smoke, "default")
    generator = torch.Generator(device).manual_seed(0)
    rows = []
    for batch, tokens in shapes:
        ids = torch.randint(1, model.config.vocab_size, (batch, tokens), device=device, generator=generator)
        step = lambda ids=ids: run(input_ids=ids, use_cache=False, logits_to_keep=1)
        row = dict(variant=variant, shape=f"{batch}x{tokens}")
        try:
            path = Path(f"{profile_stem}-{_slug(variant)}-{row['shape']}.txt") if profile_stem else None
            measure_shape(row, step, device, path)
        except Exception as error:  # e.g. torch's 2:4 tensors in a dynamic-shape graph: reported, not fatal
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        row["graphs"] = counters["stats"]["unique_graphs"]
        rows.append(row)
        log(f"  {variant} {row['shape']}: {row}")
    if static_reference and device == "cuda":  # the same shapes, each in a fresh static compile
        for row, (batch, tokens) in zip(rows, shapes):
            torch._dynamo.reset()
            static = compiled(variant, model, smoke, "default", dynamic=False)
            ids = torch.randint(1, model.config.vocab_size, (batch, tokens), device=device, generator=generator)
            with torch.no_grad():
                step = lambda ids=ids, static=static: static(input_ids=ids, use_cache=False, logits_to_keep=1)
                step()
                row["static_graph_ms"] = graph_us([step], replays=15) / 1e3
            log(f"  {variant} {row['shape']} static compile: {row['static_graph_ms']:.3f} ms")
    return rows


def measure_shape(row: dict, step: Callable, device: str, profile_path: Path | None) -> None:
    """First call seconds, wall ms as called, CUDA-graph ms, and where a call's CPU goes, of one shape."""
    from triton.testing import do_bench

    with torch.no_grad():
        row["first_call_s"], row["passes_s"], row["compile_phases_s"] = first_call(step, device)
        step()
        if device == "cuda":
            row["wall_ms"] = do_bench(step, warmup=25, rep=200, return_mode="median")
            row["graph_ms"] = graph_us([step], replays=15) / 1e3
        if device == "cuda" or profile_path is not None:
            row.update(call_profile(step, profile_path))


def first_call(run: Callable, device: str) -> tuple[float, float, dict[str, float]]:
    """Seconds of a call that compiles, the seconds of vnm's passes in the graphs it compiled, and the
    compile phases of torch's timers that took at least COMPILE_PHASE_FLOOR seconds of it (nested:
    Dynamo's tracing, the backend, Inductor's lowering and code generation, the kernels' compiles,
    the last summed over the compile workers)."""
    earlier = vnm_compile.reports()  # held, so that no id below is one recycled by a new report
    seen = {id(report) for report in earlier}
    timers = compile_timers()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize() if device == "cuda" else None
    seconds = time.perf_counter() - start
    passes = sum(sum(report.seconds.values()) for report in vnm_compile.reports() if id(report) not in seen)
    grown = {phase: total - timers.get(phase, 0.0) for phase, total in compile_timers().items()}
    return seconds, passes, {phase: round(s, 2) for phase, s in grown.items() if s >= COMPILE_PHASE_FLOOR}


def compile_timers() -> dict[str, float]:
    """Seconds spent so far in each compile phase torch times (Dynamo's aggregate timers)."""
    from torch._dynamo.utils import compile_times

    names, totals = compile_times(repr="csv", aggregate=True)
    return {name: float(total) for name, total in zip(names, totals, strict=True)}


def generate(variant: str, model: nn.Module, smoke: bool, device: str, batches: tuple[int, ...],
             profile_stem: Path | None = None) -> list[dict]:
    """Greedy generate() with a static cache, its decode step compiled in "reduce-overhead": tokens/s.
    With `profile_stem`, one more generate() under torch.profiler: where a decode step's time goes
    (`decode_step_profile`), its tables in <profile_stem>-<variant>-b<batch>.txt."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    if variant.startswith("vnm-"):  # torch.compile takes a mode or options: the mode goes in the options
        options = vnm_options(int(variant.rsplit(":", 1)[1]), smoke, "reduce-overhead")
        compile_config = CompileConfig(backend="vnm", mode=None, options=options)
    else:
        compile_config = CompileConfig()
    compile_config._compile_all_devices = smoke  # transformers compiles on CUDA only, unless told
    rows = []
    for batch in batches:
        prompt = torch.randint(1, model.config.vocab_size, (batch, PROMPT if not smoke else 16), device=device,
                               generator=torch.Generator(device).manual_seed(batch))
        new = NEW_TOKENS if not smoke else 8
        settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
                        pad_token_id=0, compile_config=compile_config)
        with torch.no_grad():
            first, passes, phases = first_call(functools.partial(model.generate, prompt, **settings), device)
            times = []
            for _ in range(GENERATE_REPEATS):  # a generate() is one sample of a CPU-bound loop: the median of a few
                torch.cuda.synchronize() if device == "cuda" else None
                start = time.perf_counter()
                model.generate(prompt, **settings)
                torch.cuda.synchronize() if device == "cuda" else None
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rows.append(dict(variant=variant, batch=batch, tokens_per_s=batch * new / seconds, seconds=seconds,
                         seconds_each=times, new_tokens=new, first_generate_s=first, passes_s=passes,
                         compile_phases_s=phases))
        if profile_stem is not None:
            path = Path(f"{profile_stem}-{_slug(variant)}-b{batch}.txt")
            rows[-1]["profile"] = decode_step_profile(functools.partial(model.generate, prompt, **settings), path)
        log(f"  {variant} generate b{batch}: {rows[-1]}")
    return rows


def decode_step_profile(run: Callable, path: Path) -> dict:
    """One `run` (a generate()) under torch.profiler, per call of the compiled decode graph: its kernels'
    GPU ms, the V:N:M kernels' share, and the CPU ms of Dynamo's guards and of the CUDA graph's launch,
    which a generate() step waits on (it syncs at every token). The profiler's tables go to `path`."""
    events = _profiled(run)
    graphs = [e for e in events if e.key.startswith("## Call CompiledFxGraph")]
    steps = max(1, sum(e.count for e in graphs))
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]

    def cpu_ms(name: str) -> float:
        return sum(e.cpu_time_total for e in events if e.key == name) / steps / 1e3

    path.write_text(events.table(sort_by="self_cpu_time_total", row_limit=40) + "\n\nGPU kernels by time\n" + "\n".join(
        f"{e.count:8d} {e.self_device_time_total / 1e3:9.3f} ms  {e.key[:110]}"
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:40]) + "\n")
    return dict(decode_calls=steps,
                graph_gpu_ms=sum(e.device_time_total for e in graphs) / steps / 1e3,
                vnm_kernels_gpu_ms=sum(e.self_device_time_total for e in kernels if e.key.startswith("vnm_"))
                / steps / 1e3,
                guards_cpu_ms=cpu_ms(GUARDS_EVENT), graph_launch_cpu_ms=cpu_ms("cudaGraphLaunch"))


def _profiled(run: Callable) -> Any:
    """torch.profiler's averages per event over `run`: CPU, and where there is a GPU its kernels and the
    runtime's launch calls."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        run()
        torch.cuda.synchronize() if cuda else None
    return prof.key_averages()


def add_ratios(rows: list[dict], key: str, by: str, higher_is_better: bool) -> None:
    for baseline in ("inductor", "semi-2:4"):
        base = {row[by]: row[key] for row in rows if row["variant"] == baseline and key in row}
        for row in rows:
            if key in row and row[by] in base:
                ratio = row[key] / base[row[by]] if higher_is_better else base[row[by]] / row[key]
                row[f"{key}_x_{baseline}"] = ratio


def markdown(result: dict) -> str:
    lines = [f"# End to end: {result['model']}", "", result["header"]]
    if result["flow"]:
        lines += ["", "## One compile, the shapes a server sees (default mode)", "",
                  "| variant | shape | wall ms | x inductor | x 2:4 | CUDA-graph ms | x inductor | x 2:4 | "
                  "static compile, CUDA-graph ms | CPU us / sparse linear | graphs | first call s (passes) |",
                  "|" + "---|" * 12]
    for r in result["flow"]:
        if "wall_ms" not in r:
            lines.append(f"| {r['variant']} | {r['shape']} | {r.get('error', 'not timed (CPU)')} |" + " |" * 9)
            continue
        lines.append(f"| {r['variant']} | {r['shape']} | {r['wall_ms']:.3f} | {_x(r, 'wall_ms_x_inductor')} | "
                     f"{_x(r, 'wall_ms_x_semi-2:4')} | {r['graph_ms']:.3f} | {_x(r, 'graph_ms_x_inductor')} | "
                     f"{_x(r, 'graph_ms_x_semi-2:4')} | {_f(r.get('static_graph_ms'), '.3f')} | "
                     f"{_cpu_us(r)} | {r['graphs']} | "
                     f"{r['first_call_s']:.1f}{_passes(r)} |")
    profiled = [r for r in result["flow"] if "region_cpu_ms" in r]
    if profiled:
        lines += ["", f"Where a call's CPU time goes (torch.profiler over {PROFILED_CALLS} calls as called; per call; "
                  "`--profile` writes the tables):", "",
                  "| variant | shape | wall ms | compiled region, CPU ms | guards, CPU ms | kernel launches |",
                  "|" + "---|" * 6]
        for r in profiled:
            lines.append(f"| {r['variant']} | {r['shape']} | {_f(r.get('wall_ms'), '.3f')} | "
                         f"{r['region_cpu_ms']:.3f} | {r['guards_cpu_ms']:.3f} | {r['launches']:.0f} |")
    if result["generate"]:
        lines += ["", f"## generate(): prompt {PROMPT} -> {NEW_TOKENS} new tokens, static cache, "
                  "mode=\"reduce-overhead\"", "",
                  "| variant | batch | tokens/s | x inductor | x 2:4 | first generate s (passes) |", "|" + "---|" * 6]
    for r in result["generate"]:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['variant']} | {r.get('batch', '')} | {r.get('error', '')} | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                     f"{_x(r, 'tokens_per_s_x_inductor')} | {_x(r, 'tokens_per_s_x_semi-2:4')} | "
                     f"{r['first_generate_s']:.1f}{_passes(r)} |")
    profiled = [r for r in result["generate"] if "profile" in r]
    if profiled:
        lines += ["", "Where a decode step goes (`--profile`: one more generate() under torch.profiler; per call of "
                  "the compiled decode graph):", "",
                  "| variant | batch | ms a token (timed) | graph's kernels, GPU ms | of which V:N:M kernels | "
                  "guards, CPU ms | graph launch, CPU ms |", "|" + "---|" * 7]
        for r in profiled:
            p = r["profile"]
            lines.append(f"| {r['variant']} | {r['batch']} | {r['seconds'] * 1e3 / r['new_tokens']:.2f} | "
                         f"{p['graph_gpu_ms']:.2f} | {p['vnm_kernels_gpu_ms']:.2f} | {p['guards_cpu_ms']:.2f} | "
                         f"{p['graph_launch_cpu_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def _slug(variant: str) -> str:
    return variant.replace(":", "_")  # ':' does not travel well in file names


def _passes(row: dict) -> str:
    """' (x.x)': the seconds of vnm's passes in a first call, where it ran them."""
    return f" ({row['passes_s']:.1f})" if row.get("passes_s") else ""


def _cpu_us(row: dict) -> str:
    """vnm's per-call op's CPU us, 'no per-call op' where the profile found none, blank where not profiled."""
    if not row["variant"].startswith("vnm-"):
        return ""
    if "sparse_linear_cpu_us" in row and row["sparse_linear_cpu_us"] is None:
        return "no per-call op"
    return _f(row.get("sparse_linear_cpu_us"), ".1f")


def _x(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else ""


def _f(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def appended(result: dict, earlier: dict, variants: list[str]) -> dict:
    """`result` holding `earlier`'s rows of variants other than `variants`; refused across devices or models."""
    for key in ("model", "device", "torch", "triton"):
        if earlier[key] != result[key]:
            raise SystemExit(f"--append: the earlier result's {key} is {earlier[key]!r}, this run's {result[key]!r}")
    kept = [v for v in dict.fromkeys(r["variant"] for r in earlier["flow"] + earlier["generate"]) if v not in variants]
    for table in ("flow", "generate"):
        result[table] = [r for r in earlier[table] if r["variant"] in kept]
    result["header"] += (f" Rows of {', '.join(kept)} from the run of {earlier['date']} (commit {earlier['commit']}) "
                         "on the same kind of device.") if kept else ""
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--generate", default="inductor,vnm-64:2:8,vnm-64:2:16,semi-2:4",
                        help="variants that also run generate()")
    parser.add_argument("--batches", default="1,16", help="generate() batch sizes")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU")
    parser.add_argument("--shapes", default=None,
                        help="the flow's shapes in order, BATCHxTOKENS comma-separated; empty: generate() alone "
                             "(default: the server's order, " + ",".join(f"{b}x{t}" for b, t in FLOW) + ")")
    parser.add_argument("--profile", action="store_true",
                        help="also write each flow call's profiles, and profile one generate() a batch: where "
                             "a decode step's time goes")
    parser.add_argument("--static-reference", action="store_true",
                        help="also time each shape in a fresh static compile (CUDA-graph ms)")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    parser.add_argument("--append", type=Path, metavar="JSON",
                        help="keep the other variants' rows of this earlier result of the same device and model "
                             "(a run split over several commands)")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or (device == "cpu" and "semi-2:4" in variants and not args.smoke):
        raise SystemExit(f"unknown variants {unknown}; known: {VARIANTS} (semi-2:4 needs CUDA)")
    shapes = SMOKE_FLOW if args.smoke else FLOW
    if args.shapes is not None:
        shapes = tuple(tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",") if shape)
    if device == "cpu":
        variants = [v for v in variants if v != "semi-2:4"]
    import transformers

    transformers.logging.set_verbosity_error()
    model = llama(args.layers, args.smoke, device)
    description = (f"Llama-2-7B-shaped, {model.config.num_hidden_layers} layers, {next(model.parameters()).dtype}, "
                   "random weights, lm_head dense")
    result = {"model": description, **device_record(device), "flow": [], "generate": []}
    result["header"] = (f"{result['device']}, {result['date']}, torch {result['torch']}, triton {result['triton']}, "
                        f"transformers {transformers.__version__}, commit {result['commit']}.")
    if args.append:
        result = appended(result, json.loads(args.append.read_text()), variants)
    stem = args.out / f"e2e-{result['slug']}"
    for variant in variants:
        target = semi_structured(model) if variant == "semi-2:4" else model
        result["flow"] += flow(variant, target, shapes, args.smoke, device, args.static_reference,
                               Path(f"{stem}-flow-profile") if args.profile else None)
        add_ratios(result["flow"], "wall_ms", "shape", higher_is_better=False)
        add_ratios(result["flow"], "graph_ms", "shape", higher_is_better=False)
        write_results(stem, result, markdown(result))  # kept if generate() outlasts the command's time limit
        if variant in args.generate.split(","):
            try:
                batches = tuple(int(b) for b in args.batches.split(",") if b)
                result["generate"] += generate(variant, target, args.smoke, device, batches,
                                               Path(f"{stem}-profile") if args.profile else None)
            except Exception as error:  # a variant that fails is reported, not fatal to the others
                result["generate"].append(dict(variant=variant, error=f"{type(error).__name__}: {error}"[:300]))
                log(f"  {variant} generate failed: {result['generate'][-1]['error']}")
        add_ratios(result["generate"], "tokens_per_s", "batch", higher_is_better=True)
        write_results(stem, result, markdown(result))
        del target
    log(markdown(result))
    return result


if __name__ == "__main__":
    main()
