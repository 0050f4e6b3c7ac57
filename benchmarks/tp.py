"""Tensor parallelism, dense vs V:N:M: a Llama-2-7B-shaped model over 2 GPUs, time per step and weight memory per GPU.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.tp --out $OUT                 # 2 GPUs, NCCL, 32 layers
    torchrun --standalone --nproc-per-node 2 -m benchmarks.tp --smoke --out /tmp/tp      # CPU, gloo, a tiny model

Model: transformers' LlamaForCausalLM with the Llama-2-7B config (`benchmarks.e2e.llama`: random fp16
weights, identical on every rank). Variants, one after the other: dense, and `vnm.sparsify` at 64:2:M
(RIA masks, no permutation search: random weights give it nothing to find; lm_head dense), each then
sharded by one Megatron-style plan, through `parallelize_module` (dense) or `vnm.parallelize` (sparse):
q/k/v and gate/up colwise, o and down rowwise, the embedding rowwise and lm_head colwise (logits
replicated). Each variant's full model first runs the steps on one GPU: those logits are the reference
its sharded model is compared with (the dense one's difference is what fp16 rounding of a split
reduction gives; the sparse one should not differ more).

Per step (no KV cache, the last token's logits): prefill 1 x 2048, decode 1 x 1 and 16 x 1 (16
sequences, one token each), in two modes: eager, then compiled (each decoder block by Inductor, as
torchtitan compiles TP models: `block.compile()`; the sparse blocks' vnm.linear is a triton_op Inductor
takes as it is). Timed: the wall time per call as called (Python, DTensor hooks, launches), and the
GPU time of the same call replayed in a CUDA graph, collectives included (the decode target is on
the compiled one: in eager, the norms', rotary's and activations' small kernels cost more than the
weights). Memory per GPU: the bytes of the weights each rank holds (parameters and buffers, its
shards), for the layers the plan shards and the sparsifier compresses, and for all weights; beside
them torch.cuda.memory_allocated, which also counts what vnm.reports() keeps (the full compressed
weights of the last sparsify).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1, set here before any communicator exists). Rank 0 writes <out>/tp-<gpu>.json and .md.
"""

from __future__ import annotations

import os

os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Replicate  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module  # noqa: E402

import vnm_compile as vnm  # noqa: E402
from benchmarks.e2e import llama, vnm_options  # noqa: E402
from benchmarks.timing import device_record, graph_us, log, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent
VARIANTS = ("dense", "vnm-64:2:8", "vnm-64:2:16")
SHAPES = ((1, 2048), (1, 1), (16, 1))
SMOKE_SHAPES = ((1, 64), (1, 1), (4, 1))
SHARDED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = {"weight_memory_x_dense": 0.31, "decode_speedup_x_dense": 1.8}


def plan() -> dict:
    """Megatron-style: attention heads and the MLP hidden sharded, the residual stream replicated."""
    layer = {f"self_attn.{name}": ColwiseParallel() for name in SHARDED[:3]}
    layer |= {"self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
              "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    return {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate()),
            **{f"model.layers.*.{name}": style for name, style in layer.items()}}


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of the weights this rank holds: the sharded layers' and all of them."""
    def local(tensor: torch.Tensor) -> int:
        tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return tensor.numel() * tensor.element_size()

    layers = sum(local(t) for name, module in model.named_modules() if name.rpartition(".")[2] in SHARDED
                 for t in (*module.parameters(), *module.buffers()))
    return {"layers_bytes": layers, "all_bytes": sum(local(t) for t in (*model.parameters(), *model.buffers()))}


def timed(step: Callable, device: str, iterations: int) -> dict:
    """Wall ms per call as called, and CUDA-graph ms; every rank calls `step` the same number of times,
    as its collectives need."""
    row = {}
    start = time.perf_counter()
    step()
    _sync(device)
    row["first_call_s"] = time.perf_counter() - start
    step()
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    _sync(device)
    row["wall_ms"] = 1e3 * (time.perf_counter() - start) / iterations
    if device == "cuda":
        dist.barrier()
        try:
            row["graph_ms"] = graph_us([step], replays=15, capture_error_mode="thread_local") / 1e3
        except Exception as error:  # reported, not fatal: the wall time stands
            row["graph_error"] = f"{type(error).__name__}: {error}"[:300]
    return row


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(variant: str, args: argparse.Namespace, mesh, device: str, inputs: dict) -> list[dict]:
    """Build, compress (sparse variants), take the one-GPU reference, shard, then measure each mode."""
    model = llama(args.layers, args.smoke, device)
    start = time.perf_counter()
    if variant != "dense":
        config = vnm.VNMConfig(**vnm_options(int(variant.rsplit(":", 1)[1]), args.smoke, "default"))
        example = {"input_ids": next(iter(inputs.values()))[:, :16], "use_cache": False}
        model = vnm.sparsify(model, example, config, inplace=True)
    setup = {"compress_s": time.perf_counter() - start}
    steps = {shape: (lambda ids=ids: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits)
             for shape, ids in inputs.items()}
    with torch.no_grad():
        reference = {shape: step().float() for shape, step in steps.items()}
    start = time.perf_counter()
    if variant == "dense":
        parallelize_module(model, mesh, plan())
    else:
        vnm.parallelize(model, mesh, plan())
    setup["shard_s"] = time.perf_counter() - start
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        setup["cuda_allocated_bytes"] = torch.cuda.memory_allocated()
    setup |= weight_bytes(model)
    rows = []
    for mode in args.modes.split(","):
        if mode == "compiled":
            torch._dynamo.reset()
            for block in model.model.layers:
                block.compile()
        for (batch, tokens), step in steps.items():
            row = dict(variant=variant, mode=mode, shape=f"{batch}x{tokens}", **setup)
            with torch.no_grad():
                row |= timed(step, device, iterations=(3 if tokens > 1 else 20) if device == "cuda" else 2)
                logits = step().float()
            row["max_abs_diff_vs_1gpu"] = (logits - reference[(batch, tokens)]).abs().max().item()
            row["max_abs_logit"] = reference[(batch, tokens)].abs().max().item()
            rows.append(row)
            log(f"  rank {dist.get_rank()} {variant} {mode} {row['shape']}: {row}")
    return rows


def add_ratios(rows: list[dict]) -> None:
    dense = {(row["mode"], row["shape"]): row for row in rows if row["variant"] == "dense"}
    for row in rows:
        base = dense.get((row["mode"], row["shape"]))
        if base is None:
            continue
        for key in ("layers_bytes", "all_bytes"):
            row[f"{key}_x_dense"] = row[key] / base[key]
        for key in ("wall_ms", "graph_ms"):
            if key in row and key in base:
                row[f"{key}_speedup_x_dense"] = base[key] / row[key]
        row["diff_x_dense_diff"] = row["max_abs_diff_vs_1gpu"] / max(base["max_abs_diff_vs_1gpu"], 1e-30)


def markdown(result: dict) -> str:
    lines = [f"# Tensor parallelism: {result['model']}", "", result["header"], "",
             "| variant | mode | shape | wall ms | x dense | CUDA-graph ms | x dense | layers GiB/GPU | x dense | "
             "all GiB/GPU | x dense | max abs diff vs 1 GPU | x dense's | first call s |", "|" + "---|" * 14]
    for r in result["rows"]:
        graph = f"{r['graph_ms']:.3f}" if "graph_ms" in r else r.get("graph_error", "(CPU)")
        cells = [r["variant"], r["mode"], r["shape"], f"{r['wall_ms']:.3f}", _x(r, "wall_ms_speedup_x_dense"), graph,
                 _x(r, "graph_ms_speedup_x_dense"), f"{r['layers_bytes'] / 2**30:.3f}", _x(r, "layers_bytes_x_dense"),
                 f"{r['all_bytes'] / 2**30:.3f}", _x(r, "all_bytes_x_dense"),
                 f"{r['max_abs_diff_vs_1gpu']:.3g} (of {r['max_abs_logit']:.3g})", _x(r, "diff_x_dense_diff"),
                 f"{r['first_call_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Targets (64:2:8, {result['world_size']}-way): weight memory per GPU <= "
              f"{TARGETS['weight_memory_x_dense']}x of dense (the sharded, compressed layers: 'layers'), decode "
              f"step (compiled, CUDA graph, 1x1) >= {TARGETS['decode_speedup_x_dense']}x dense, and no divergence from "
              "the one-GPU sparse model beyond what dense TP shows against one-GPU dense (fp16 rounding).", ""]
    for r in result["rows"]:
        if r["variant"] == "vnm-64:2:8" and r["shape"] == "1x1" and r["mode"] == "compiled":
            memory, speed = r.get("layers_bytes_x_dense"), r.get("graph_ms_speedup_x_dense")
            met = {True: "met", False: "missed"}
            lines.append(f"- memory: {memory:.3f}x ({met[memory <= TARGETS['weight_memory_x_dense']]})"
                         if memory is not None else "- memory: no dense row")
            lines.append(f"- decode: {speed:.2f}x ({met[speed >= TARGETS['decode_speedup_x_dense']]})"
                         if speed is not None else "- decode: not timed in a CUDA graph")
    return "\n".join(lines) + "\n"


def _x(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else ""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--variants", default="dense,vnm-64:2:8", help=f"from {VARIANTS}")
    parser.add_argument("--modes", default="eager,compiled", help="eager and/or compiled")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU over gloo")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "results")))
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if any(v not in VARIANTS for v in variants) or not set(args.modes.split(",")) <= {"eager", "compiled"}:
        raise SystemExit(f"unknown variants in {variants} (known: {VARIANTS}) or modes in {args.modes}")
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun: torchrun --standalone --nproc-per-node 2 -m benchmarks.tp [--smoke]")
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=5))
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    import transformers

    transformers.logging.set_verbosity_error()
    generator = torch.Generator(device).manual_seed(0)
    vocab = 128 if args.smoke else 32000
    inputs = {shape: torch.randint(1, vocab, shape, device=device, generator=generator)
              for shape in (SMOKE_SHAPES if args.smoke else SHAPES)}
    record = device_record(device)
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if device == "cuda" else "none"
    result = {"model": "tiny Llama (smoke)" if args.smoke else
              f"Llama-2-7B-shaped, {args.layers} layers, fp16, random weights, lm_head dense",
              **record, "world_size": dist.get_world_size(), "backend": dist.get_backend(),
              "transformers": transformers.__version__, "rows": []}
    result["header"] = (f"{record['device']} x {result['world_size']} ({result['backend']}, NCCL {nccl}, NVLink "
                        f"multicast off), {record['date']}, torch {record['torch']}, triton {record['triton']}, "
                        f"transformers {transformers.__version__}, commit {record['commit']}.")
    for variant in variants:  # written after each variant: a run cut short keeps what it measured
        result["rows"] += run_variant(variant, args, mesh, device, inputs)
        torch._dynamo.reset()  # the compiled blocks hold the variant's model: free it before the next
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        add_ratios(result["rows"])
        if dist.get_rank() == 0:
            write_results(args.out / f"tp-{record['slug']}", result, markdown(result))
    if dist.get_rank() == 0:
        log(markdown(result))
    dist.barrier()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
