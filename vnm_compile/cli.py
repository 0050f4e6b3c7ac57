"""The `vnm` command. Each subcommand imports what it needs when it runs: --help answers at once."""

from __future__ import annotations

import argparse
import time

LLAMA_7B_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))


def formats(args: argparse.Namespace) -> None:
    """Mask time and compressed size of V:N:M patterns on Llama-7B layer shapes."""
    import math

    import torch

    from .format import MAX_ENUMERATED_SUBSETS, VNMWeight, log_mask_diversity, vnm_mask

    generator = torch.Generator().manual_seed(0)
    print(f"masks of random Llama-7B-shaped weights at {args.v}:2:M on {torch.get_num_threads()} CPU threads; "
          "each row is printed when measured", flush=True)
    print(f"{'shape':>12} {'pattern':>8} {'rule':>8} {'mask s':>7} {'bytes/dense':>11} {'x (2/M)':>8} {'log div':>8}")
    for rows, cols in LLAMA_7B_SHAPES:
        weight = torch.randn(rows, cols, generator=generator).to(torch.float16)
        for m in args.m:
            # "optimal" enumerates C(m, 4) column subsets; beyond MAX_ENUMERATED_SUBSETS only "l1" runs
            rules = ("l1", "optimal") if math.comb(m, 4) <= MAX_ENUMERATED_SUBSETS else ("l1",)
            for rule in rules:
                start = time.perf_counter()
                mask = vnm_mask(weight.abs().float(), args.v, m, rule)
                elapsed = time.perf_counter() - start
                compressed = VNMWeight.from_dense(weight, args.v, m, mask=mask)
                ratio = compressed.nbytes / (weight.numel() * weight.element_size())
                print(f"{rows:>5}x{cols:<6} {args.v:>3}:2:{m:<2} {rule:>8} {elapsed:7.3f} {ratio:11.4f} "
                      f"{ratio * m / 2:8.4f} {log_mask_diversity(args.v, m):8.4f}", flush=True)
    skipped = [m for m in args.m if math.comb(m, 4) > MAX_ENUMERATED_SUBSETS]
    if skipped:
        print(f"(M = {', '.join(map(str, skipped))}: 'optimal' would enumerate more than {MAX_ENUMERATED_SUBSETS} "
              "subsets per block, so only the 'l1' rule is shown)")


def demo(args: argparse.Namespace) -> None:
    """Compress SmolLM2-135M and compare it with dense (--builtin-only: a random-weight model through the backend)."""
    from .demo import demo as run_demo

    run_demo(args.v, args.m, args.device, pretrained=not args.builtin_only)


def explain(args: argparse.Namespace) -> None:
    """Write the HTML report (vnm_compile.explain) for a model factory: a zero-argument function,
    named as file.py:function or package.module:function, that returns (model, example_inputs)."""
    import torch

    from .config import VNMConfig
    from .explanation import explain as explain_model

    factory = load_factory(args.factory)
    made = factory()
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise SystemExit(f"vnm explain: {args.factory} must return (model, example_inputs), "
                         f"got {type(made).__name__}")
    model, example_inputs = made
    config = VNMConfig(v=args.v, m=args.m, criterion=args.criterion, min_features=args.min_features,
                       skip=args.skip, only=args.only, exclude=args.exclude, allow_small_v=args.allow_small_v)
    report = explain_model(model.eval(), example_inputs, config)
    print(report)
    print(f"wrote {report.html(args.out)}")


def load_factory(spec: str):
    """The callable named by 'path/to/file.py:name' or 'package.module:name' (found from the current
    directory, as `python -m` would). A file is imported as a module registered under its name, so that
    code which looks its functions' module up (Dynamo does) finds it."""
    import importlib
    import importlib.util
    import os
    import sys

    source, _, name = spec.rpartition(":")
    if not source or not name:
        raise SystemExit(f"vnm explain: expected <python-file-or-module>:<factory>, got {spec!r}")
    if source.endswith(".py") or os.path.sep in source:
        if not os.path.isfile(source):
            raise SystemExit(f"vnm explain: no such file {source!r}")
        name_of_module = os.path.splitext(os.path.basename(source))[0]
        module_spec = importlib.util.spec_from_file_location(name_of_module, source)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name_of_module] = module
        module_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(source)
        except ImportError as error:
            raise SystemExit(f"vnm explain: cannot import module {source!r}: {error}") from error
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SystemExit(f"vnm explain: {source!r} has no callable {name!r}")
    return factory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vnm", description="V:N:M structured sparsity for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    formats_parser = commands.add_parser("formats", help=formats.__doc__)
    formats_parser.add_argument("--v", type=int, default=64)
    formats_parser.add_argument("--m", type=int, nargs="+", default=[5, 8, 16])
    formats_parser.set_defaults(run=formats)
    demo_parser = commands.add_parser("demo", help=demo.__doc__)
    demo_parser.add_argument("--v", type=int, default=64)
    demo_parser.add_argument("--m", type=int, default=5)
    demo_parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo_parser.add_argument("--builtin-only", action="store_true",
                             help="a random-weight model through the backend instead of SmolLM2 (a quick check)")
    demo_parser.set_defaults(run=demo)
    explain_parser = commands.add_parser("explain", help=explain.__doc__.split(":")[0])
    explain_parser.add_argument("factory", help="file.py:function or package.module:function "
                                "returning (model, example_inputs)")
    explain_parser.add_argument("--out", default="vnm-report.html", help="the HTML file to write")
    explain_parser.add_argument("--v", type=int, default=64)
    explain_parser.add_argument("--m", type=int, default=8)
    explain_parser.add_argument("--criterion", default="ria")
    explain_parser.add_argument("--min-features", type=int, default=64)
    explain_parser.add_argument("--allow-small-v", action="store_true")
    for field_name in ("skip", "only", "exclude"):
        explain_parser.add_argument(f"--{field_name}", nargs="*", default=[], help="module-name glob patterns")
    explain_parser.set_defaults(run=explain)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
