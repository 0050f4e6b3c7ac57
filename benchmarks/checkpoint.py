"""Compressed checkpoints of a Llama-2-7B-shaped model at 64:2:8: file size, load time, peak memory.

    PYTHONPATH=. python3 benchmarks/checkpoint.py             # GPU, 32 layers (~21 GB of files in a temp dir)
    PYTHONPATH=. python3 benchmarks/checkpoint.py --layers 2  # CPU (~3 min on 2 cores), or a quick GPU run

The model is transformers' LlamaForCausalLM with the Llama-2-7B config and random fp16 weights. Its
linears (lm_head excepted) are compressed directly, `VNMWeight.from_dense` on |w| ("l1" column rule,
no passes: the file's size and the load do not depend on which mask was chosen). Written: the dense
model by `save_pretrained` (the baseline), the sparse one by `save_pretrained` and by
`vnm.save_compressed`. Reported: bytes on disk against the budget of the issue (the sparse linears at
most 0.31x of their dense bytes, everything else unchanged), and for each of dense `from_pretrained`,
sparse `from_pretrained` and `vnm.load_compressed`, in a fresh process each (imports not timed; the
files are in the page cache, having just been written): the load's wall time and its peak memory
(CUDA: torch.cuda.max_memory_allocated; CPU: the peak of torch's CPU allocations, from the
profiler's memory events, which also slow the CPU loads a little; safetensors maps the file, so
those bytes become resident as they are read), next to the bytes the loaded model holds. The loaded
sparse model's logits are checked bit-equal to the model that was saved. JSON and markdown go to
$OUT if set, else benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package transformers looks for
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import vnm_compile as vnm  # noqa: E402
from vnm_compile.checkpoint import record_sparse_layers  # noqa: E402
from vnm_compile.kernels.tuning import gpu_slug  # noqa: E402

ROOT = Path(__file__).resolve().parent
V, M = 64, 8
BUDGET = 0.31  # the sparse linears' bytes over their dense bytes


def llama_config(layers: int):
    import transformers

    return transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                    num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                                    max_position_embeddings=4096, rms_norm_eps=1e-5, dtype="float16")


def dense_model(config, device: str):
    import transformers

    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()


def compress(model) -> tuple[int, int]:
    """Replace every linear but lm_head by a VNMLinear, in place; (dense bytes, compressed bytes) of them."""
    dense_bytes = sparse_bytes = 0
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and name != "lm_head"]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, leaf)
        weight = vnm.VNMWeight.from_dense(linear.weight.detach(), V, M, column_select="l1")
        dense_bytes += linear.weight.numel() * linear.weight.element_size()
        sparse_bytes += weight.nbytes
        setattr(parent, leaf, vnm.VNMLinear(weight, linear.bias))  # the dense weight is freed here
    record_sparse_layers(model)  # what sparsify does: the quantization_config save_pretrained writes
    return dense_bytes, sparse_bytes


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def disk_bytes(path: Path) -> int:
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


# ------------------------------------------------------------------------- one load, in its own process
def load(kind: str, path: Path | str, config, device: str):
    """The checkpoint at `path`: "dense" and "pretrained" by from_pretrained, "file" by vnm.load_compressed
    (the model built from the dense `config`, as elsewhere one would)."""
    import transformers

    if kind == "file":
        return vnm.load_compressed(lambda: transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16),
                                   path, device=device)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map=device)


def measure(kind: str, path: str, dense_dir: str, device: str) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.from_pretrained(dense_dir)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model = load(kind, path, config, device)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated()
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            start = time.perf_counter()
            model = load(kind, path, config, device)
            seconds = time.perf_counter() - start
        events = sorted((e for e in prof.events() if e.name == "[memory]"), key=lambda e: e.time_range.start)
        peak = held = 0
        for event in events:
            held += event.cpu_memory_usage
            peak = max(peak, held)
    held_bytes = tensor_bytes([*model.parameters(), *model.buffers()])
    return {"load_s": seconds, "peak_bytes": peak, "model_bytes": held_bytes}


def measure_in_subprocess(kind: str, path: Path, dense_dir: Path, device: str) -> dict:
    command = [sys.executable, __file__, "--measure", kind, "--path", str(path), "--dense-dir", str(dense_dir),
               "--device", device]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")])}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the run
def commit() -> str:
    """The checkout's commit, "+dirty" when it has uncommitted changes."""
    try:
        head, status = (subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, check=True).stdout
                        for command in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.strip() + ("+dirty" if status.strip() else "")


def run(layers: int, device: str, workdir: Path) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = llama_config(layers)
    start = time.perf_counter()
    model = dense_model(config, device)
    dense_dir = workdir / "dense"
    model.save_pretrained(dense_dir)
    all_bytes = tensor_bytes([*model.parameters(), *model.buffers()])
    print(f"dense model built and saved: {time.perf_counter() - start:.0f} s", flush=True)
    start = time.perf_counter()
    dense_linear_bytes, sparse_linear_bytes = compress(model)
    unchanged_bytes = all_bytes - dense_linear_bytes
    print(f"compressed: {time.perf_counter() - start:.0f} s", flush=True)
    sparse_dir, sparse_file = workdir / "sparse", workdir / "model.vnm.safetensors"
    model.save_pretrained(sparse_dir)
    vnm.save_compressed(model, sparse_file)
    ids = torch.randint(0, config.vocab_size, (1, 8), device=device)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    loaded = {kind: measure_in_subprocess(kind, path, dense_dir, device)
              for kind, path in (("dense", dense_dir), ("pretrained", sparse_dir), ("file", sparse_file))}
    with torch.no_grad():  # bit-exact round trip, both formats
        exact = {kind: torch.equal(load(kind, path, config, device)(input_ids=ids).logits, expected)
                 for kind, path in (("pretrained", sparse_dir), ("file", sparse_file))}
    budget_bytes = BUDGET * dense_linear_bytes + unchanged_bytes
    rows = []
    for kind, path, what in (("dense", dense_dir, "dense save_pretrained / from_pretrained"),
                             ("pretrained", sparse_dir, "64:2:8 save_pretrained / from_pretrained"),
                             ("file", sparse_file, "64:2:8 vnm.save_compressed / vnm.load_compressed")):
        size = disk_bytes(path)
        rows.append({"variant": what, "disk_bytes": size, "vs_dense": size / disk_bytes(dense_dir),
                     "within_budget": size <= budget_bytes if kind != "dense" else None,
                     "bit_exact": exact.get(kind), **loaded[kind]})
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'cpu'})"
    return {"device": device_name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__, "commit": commit(),
            "model": f"Llama-2-7B shapes, {layers} layers, fp16, random weights; {V}:2:{M} on every linear but lm_head",
            "dense_linear_bytes": dense_linear_bytes, "sparse_linear_bytes": sparse_linear_bytes,
            "sparse_linear_ratio": sparse_linear_bytes / dense_linear_bytes, "unchanged_bytes": unchanged_bytes,
            "budget_bytes": budget_bytes, "rows": rows}


def markdown(result: dict) -> str:
    gib = 2**30
    lines = [f"# Compressed checkpoints: {result['model']}", "",
             f"{result['device']}, {result['date']}, torch {result['torch']}, transformers {result['transformers']}, "
             f"commit {result['commit'][:12]}{'+dirty' if result['commit'].endswith('+dirty') else ''}", "",
             f"Sparse linears: {result['sparse_linear_bytes'] / gib:.2f} GiB, {result['sparse_linear_ratio']:.3f}x "
             f"their dense {result['dense_linear_bytes'] / gib:.2f} GiB; unchanged parameters "
             f"{result['unchanged_bytes'] / gib:.2f} GiB; budget ({BUDGET}x linears + unchanged) "
             f"{result['budget_bytes'] / gib:.2f} GiB.", "",
             "| checkpoint | on disk GiB | vs dense | within budget | bit-exact | load s | peak GiB | model GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        lines.append(f"| {row['variant']} | {row['disk_bytes'] / gib:.2f} | {row['vs_dense']:.3f}x | "
                     f"{'-' if row['within_budget'] is None else row['within_budget']} | "
                     f"{'-' if row['bit_exact'] is None else row['bit_exact']} | {row['load_s']:.2f} | "
                     f"{row['peak_bytes'] / gib:.2f} | {row['model_bytes'] / gib:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    parser.add_argument("--measure", choices=("dense", "pretrained", "file"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--dense-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.path, args.dense_dir, args.device)))
        return None
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        result = run(args.layers, args.device, Path(workdir))
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"checkpoint-{args.layers}layers-{gpu_slug(result['device']) if args.device == 'cuda' else 'cpu'}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
