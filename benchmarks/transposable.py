"""Transposable N:M masks: solver time and retained-score gap against the exact optimum and a greedy baseline.

    python3 -m benchmarks.transposable                 # CUDA if available, else CPU
    python3 -m benchmarks.transposable --device cpu    # full shapes on the CPU (slow)
    python3 -m benchmarks.transposable --quick         # small shapes: a smoke test
    python3 -m benchmarks.transposable --shapes 2048x2048 --device cpu

Weights 4096x4096 and 11008x4096 (Llama-2-7B) at 2:4, 4:8, 8:16, 16:32, Wanda-like scores
(|w| * ||x_j|| with w ~ N(0, 1) and log-normal activation norms). Per case:
- ours: `transposable_mask` (Dykstra + rounding) on the device, median of a few timed runs (after a
  warm-up on CUDA); greedy: `greedy_transposable_mask` likewise; plain: row-wise `nm_mask` (not transposable:
  how much score transposability costs).
- exact: `exact_transposable_mask`. At m = 4 it enumerates every block on the device, over the whole
  weight. Otherwise it solves linear programs (HiGHS, on the CPU), which would take minutes to hours
  for a whole weight: it runs on a random sample of blocks (--sample-blocks, the same blocks for
  every solver) and its time is extrapolated to the whole weight by blocks; the LP's time is also
  given at m = 4, measured the same way. Gaps are measured on the blocks the exact solver ran on.
Writes benchmarks/results/transposable-<device>.json and .md (or into $OUT / --out) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.timing import git_commit
from vnm_compile import transposable
from vnm_compile.kernels.tuning import gpu_slug
from vnm_compile.transposable import exact_transposable_mask, greedy_transposable_mask, nm_mask, transposable_mask

SHAPES = [(4096, 4096), (11008, 4096)]
QUICK_SHAPES = [(128, 128), (256, 128)]
PATTERNS = [(2, 4), (4, 8), (8, 16), (16, 32)]
ROOT = Path(__file__).resolve().parent


def wanda_like(rows: int, cols: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g, device=device)
    act_norms = torch.randn(1, cols, generator=g, device=device).exp()
    return weight.abs() * act_norms


def timed(fn, device: str, repeats: int, warm_up: bool = True):
    """(last result, median seconds of `repeats` runs), after one untimed run on CUDA if `warm_up`
    (lazy initialisation, caching allocator; the CPU has nothing comparable to warm)."""
    if warm_up and device == "cuda":
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def sampled(scores: torch.Tensor, m: int, blocks: torch.Tensor) -> torch.Tensor:
    """The chosen m x m blocks of `scores` side by side: an m x (len(blocks) * m) matrix."""
    picked = transposable._blocks(scores, m, scores.dtype)[blocks]
    return picked.permute(1, 0, 2).reshape(m, -1)


def run_case(rows: int, cols: int, n: int, m: int, device: str, sample_blocks: int, repeats: int) -> dict:
    scores = wanda_like(rows, cols, device)
    block_count = (rows // m) * (cols // m)
    ours, ours_s = timed(lambda: transposable_mask(scores, n, m), device, repeats)
    greedy, greedy_s = timed(lambda: greedy_transposable_mask(scores, n, m), device, repeats)
    plain, plain_s = timed(lambda: nm_mask(scores, n, m), device, repeats)
    feasible = bool(transposable._blocks(ours, m).sum(2).eq(n).all()
                    and transposable._blocks(ours, m).sum(1).eq(n).all())

    # The exact optimum: whole weight by enumeration where it exists, else LPs on a sample of blocks.
    sample = torch.randperm(block_count, generator=torch.Generator().manual_seed(1))[: min(sample_blocks, block_count)]
    sample = sample.sort().values.to(device)
    whole = transposable._feasible_blocks(n, m) is not None
    if whole:
        exact, exact_s = timed(lambda: exact_transposable_mask(scores, n, m), device, repeats)
        on_blocks, gap_blocks = slice(None), block_count
        # the LP reference, timed on sampled blocks, for comparison with the other patterns
        lp_blocks = transposable._blocks(sampled(scores, m, sample[:256]), m, torch.float64).cpu().numpy()
        lp_sample_s = timed(lambda: transposable._exact_lp(lp_blocks, n), device, 1, warm_up=False)[1]
        lp_s = lp_sample_s * block_count / len(lp_blocks)
    else:
        exact, sample_s = timed(lambda: exact_transposable_mask(sampled(scores, m, sample), n, m), device, 1,
                                warm_up=False)
        exact_s = lp_s = sample_s * block_count / len(sample)
        on_blocks, gap_blocks = sample, len(sample)

    def retained(mask: torch.Tensor) -> float:
        return float(transposable._blocks(scores * mask, m, torch.float64)[on_blocks].sum())

    optimum = retained(exact) if whole else float((sampled(scores, m, sample).double() * exact).sum())
    case = {
        "rows": rows, "cols": cols, "n": n, "m": m, "blocks": block_count,
        "ours_s": ours_s, "greedy_s": greedy_s, "plain_nm_s": plain_s,
        "exact_method": "enumeration, whole weight" if whole else "LP on sampled blocks, time extrapolated",
        "exact_s": exact_s, "lp_s": lp_s, "gap_blocks": gap_blocks,
        "ours_gap_pct": 100 * (optimum - retained(ours)) / optimum,
        "greedy_gap_pct": 100 * (optimum - retained(greedy)) / optimum,
        "ours_vs_plain_nm_pct": 100 * float((scores * ours).double().sum() / (scores * plain).double().sum()),
        "speedup_vs_exact": exact_s / ours_s, "speedup_vs_lp": lp_s / ours_s,
        "feasible": feasible,
    }
    return case


def markdown(results: dict) -> str:
    lines = [
        f"# Transposable N:M masks on {results['device']}",
        "",
        f"{results['date']}, torch {results['torch']}, commit {results['commit']}, "
        f"CPU threads: {results['cpu_threads']}; "
        f"scores {results['scores']}; "
        f"defaults: {results['defaults']}. "
        f"Times are medians of {results['repeats']} runs (after a warm-up run on CUDA). "
        "Gap = retained score lost against the exact optimum, on the blocks the exact solver ran on; "
        "exact = enumeration where m <= 4 (whole weight), else HiGHS LPs on the CPU on sampled blocks with "
        "the time extrapolated; LP = the LP reference at every m. ours/plain = retained score against "
        "plain (row-wise, not transposable) N:M.",
        "",
        "| weight | N:M | ours s | greedy s | exact s | LP s | vs exact | vs LP | gap ours % | gap greedy % "
        "| gap blocks | ours/plain % | feasible |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["cases"]:
        lines.append(
            f"| {c['rows']}x{c['cols']} | {c['n']}:{c['m']} | {c['ours_s']:.3f} | {c['greedy_s']:.3f} | "
            f"{c['exact_s']:.3g} | {c['lp_s']:.3g} | {c['speedup_vs_exact']:.3g}x | {c['speedup_vs_lp']:.3g}x | "
            f"{c['ours_gap_pct']:.3f} | {c['greedy_gap_pct']:.3f} | {c['gap_blocks']} | "
            f"{c['ours_vs_plain_nm_pct']:.2f} | "
            f"{'yes' if c['feasible'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, one timed run: a smoke test")
    parser.add_argument("--sample-blocks", type=int, default=512, help="blocks the LP reference solves per case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", help="weights to run instead, e.g. 64x64,96x64")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "results"))
    args = parser.parse_args(argv)
    shapes, repeats, sample_blocks = ((QUICK_SHAPES, 1, min(args.sample_blocks, 32)) if args.quick
                                      else (SHAPES, args.repeats, args.sample_blocks))
    if args.shapes:
        shapes = [tuple(int(side) for side in shape.split("x")) for shape in args.shapes.split(",")]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    results = {
        "device": device_name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "commit": git_commit(), "repeats": repeats, "quick": args.quick, "cpu_threads": torch.get_num_threads(),
        "scores": "|w| * exp(z_j), w, z ~ N(0, 1)",
        "defaults": {"iterations": transposable.ITERATIONS, "tau_start": transposable.TAU_START,
                     "tau_end": transposable.TAU_END},
        "cases": [],
    }
    print(f"{device_name}, torch {torch.__version__}")
    print(f"{'weight':>11} {'N:M':>5} {'ours s':>8} {'greedy s':>8} {'exact s':>9} {'x exact':>8} {'x LP':>8} "
          f"{'gap %':>7} {'greedy %':>8}")
    for rows, cols in shapes:
        for n, m in PATTERNS:
            c = run_case(rows, cols, n, m, args.device, sample_blocks, repeats)
            results["cases"].append(c)
            print(f"{rows:>5}x{cols:<5} {n:>2}:{m:<2} {c['ours_s']:8.3f} {c['greedy_s']:8.3f} {c['exact_s']:9.3g} "
                  f"{c['speedup_vs_exact']:7.3g}x {c['speedup_vs_lp']:7.3g}x {c['ours_gap_pct']:7.3f} "
                  f"{c['greedy_gap_pct']:8.3f}"
                  + ("" if c["feasible"] else "  INFEASIBLE"), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"transposable-{gpu_slug(device_name) if args.device == 'cuda' else 'cpu'}{'-quick' if args.quick else ''}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(markdown(results))
    print(f"wrote {out / stem}.json and .md")
    return results


if __name__ == "__main__":
    main()
