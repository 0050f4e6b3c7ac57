"""The `vnm` command."""

from __future__ import annotations

import argparse
import time

import torch

from .format import VNMWeight, log_mask_diversity, vnm_mask

LLAMA_7B_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))


def formats(args: argparse.Namespace) -> None:
    """Mask time and compressed size of V:N:M patterns on Llama-7B layer shapes."""
    generator = torch.Generator().manual_seed(0)
    print(f"{'shape':>12} {'pattern':>8} {'rule':>8} {'mask s':>7} {'bytes/dense':>11} {'x (2/M)':>8} {'log div':>8}")
    for rows, cols in LLAMA_7B_SHAPES:
        weight = torch.randn(rows, cols, generator=generator).to(torch.float16)
        for m in args.m:
            for rule in ("l1", "optimal"):
                start = time.perf_counter()
                mask = vnm_mask(weight.abs().float(), args.v, m, rule)
                elapsed = time.perf_counter() - start
                compressed = VNMWeight.from_dense(weight, args.v, m, mask=mask)
                ratio = compressed.nbytes / (weight.numel() * weight.element_size())
                print(f"{rows:>5}x{cols:<6} {args.v:>3}:2:{m:<2} {rule:>8} {elapsed:7.3f} {ratio:11.4f} "
                      f"{ratio * m / 2:8.4f} {log_mask_diversity(args.v, m):8.4f}")


def demo(args: argparse.Namespace) -> None:
    """Compile a small GPT (and SmolLM2-135M if installed) with backend="vnm": per-layer table, output difference."""
    from .demo import demo as run_demo

    run_demo(args.v, args.m, args.device, pretrained=not args.builtin_only)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vnm", description="V:N:M structured sparsity for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    formats_parser = commands.add_parser("formats", help=formats.__doc__)
    formats_parser.add_argument("--v", type=int, default=64)
    formats_parser.add_argument("--m", type=int, nargs="+", default=[5, 8, 16])
    formats_parser.set_defaults(run=formats)
    demo_parser = commands.add_parser("demo", help=demo.__doc__)
    demo_parser.add_argument("--v", type=int, default=64)
    demo_parser.add_argument("--m", type=int, default=8)
    demo_parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo_parser.add_argument("--builtin-only", action="store_true", help="skip the pretrained model")
    demo_parser.set_defaults(run=demo)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
