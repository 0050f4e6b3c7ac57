"""Autotuning of the V:N:M kernels: candidate configs, pruning, and per-GPU tables of results.

Each path is a `triton.autotune` over its kernel, keyed on (R, C, token bucket, V, M) (Triton adds
the dtypes). Pruning does two things:
  - a key found in a table (shipped with the package for a GPU in tables/<gpu>.json, or written by
    an earlier run on this machine under ~/.cache/vnm_compile) keeps only its recorded config, so
    nothing is timed; benchmarks/kernels.py writes the shipped tables from its measurements;
  - otherwise it keeps the candidates that fit the shape (`candidates`), and Triton times them
    once; `remember_tuned` then saves the winners to this machine's cache.
With VNM_AUTOTUNE=0 in the environment nothing is timed: the first fitting candidate runs.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch
import triton

from .common import interpreting, planned_count
from .decode import vnm_decode_kernel
from .prefill import ROW_MAJOR_MAX_TOKENS, vnm_prefill_kernel

TABLES = Path(__file__).with_name("tables")
USER_CACHE = Path(os.environ.get("VNM_CACHE_DIR", Path.home() / ".cache" / "vnm_compile"))
KEY = ["R", "C", "TOKEN_BUCKET", "V", "M"]


def prefill_config(block_n: int, block_t: int, block_k: int, w_left: bool, warps: int, stages: int,
                   group_n: int) -> triton.Config:
    """A config of the prefill kernel (its blocks, weight tile on the MMA's M side, row grouping)."""
    return triton.Config({"BLOCK_N": block_n, "BLOCK_T": block_t, "BLOCK_K": block_k, "W_LEFT": w_left,
                          "GROUP_N": group_n}, num_warps=warps, num_stages=stages)


def decode_config(block_n: int, block_t: int, block_j: int, use_dot: bool, warps: int, stages: int,
                  select_x: bool = False, prefetch: bool = False) -> triton.Config:
    """A config of the decode kernel (its blocks and body: tensor cores, FMA, or FMA with SELECT_X)."""
    return triton.Config({"BLOCK_N": block_n, "BLOCK_T": block_t, "BLOCK_J": block_j, "USE_DOT": use_dot,
                          "SELECT_X": select_x, "PREFETCH": prefetch},
                         num_warps=warps, num_stages=stages)


# Measured on an H200 (benchmarks/NOTES.md): weight rows on the MMA's M side for row tiles of 64 and
# 128; tokens on the M side when V = 32 or 16; 64-token tiles for short prompts; row-fastest order.
PREFILL_CONFIGS = [
    prefill_config(128, 128, 64, True, 8, 3, 32), prefill_config(128, 64, 64, True, 8, 3, 32),
    prefill_config(64, 128, 64, True, 4, 3, 64), prefill_config(64, 128, 64, True, 4, 4, 64),
    prefill_config(64, 64, 128, True, 4, 3, 64), prefill_config(64, 64, 64, True, 4, 3, 64),
    prefill_config(32, 128, 64, False, 4, 4, 128), prefill_config(32, 64, 64, False, 4, 3, 128),
    prefill_config(16, 64, 64, False, 4, 3, 128),
] + [
    # a few tokens (x read in place, row-major): 16-token tiles, narrow row tiles for enough programs
    # (round 6: they beat the decode kernel from 4 tokens on where C = 4096 and R >= 11008)
    prefill_config(32, 16, 256, False, 4, 3, 1), prefill_config(16, 16, 256, False, 4, 3, 1),
    prefill_config(64, 16, 256, True, 8, 3, 1), prefill_config(64, 16, 128, True, 4, 4, 1),
    prefill_config(64, 16, 128, False, 4, 4, 1), prefill_config(32, 16, 128, False, 4, 4, 1),
]
# FMA configs per token block (their [BLOCK_N, BLOCK_J, BLOCK_T] accumulator stays <= 64 registers a
# thread) and tensor-core configs (tokens padded to 16).
DECODE_CONFIGS = [
    decode_config(n, t, j, False, warps, stages)
    for t in (1, 2, 4, 8, 16)
    for n, j, warps, stages in ((8, 64, 4, 4), (16, 32, 4, 4), (16, 64, 4, 3), (32, 32, 4, 3), (32, 64, 4, 3),
                                (16, 16, 4, 4), (8, 32, 2, 4))
    if n * j * t <= 64 * 32 * warps
] + [decode_config(64, 16, 32, True, 4, 3), decode_config(32, 16, 32, True, 4, 3),
      decode_config(16, 16, 32, True, 4, 3),
      # one dot a tile, next tile prefetched: the 4-16-token winners of rounds 14-15 (with split-K 4)
      decode_config(64, 16, 32, True, 4, 3, prefetch=True), decode_config(64, 16, 16, True, 4, 3, prefetch=True),
      decode_config(32, 16, 16, True, 4, 3, prefetch=True)] + [
    # 1-4 tokens: each stored value times its slot's activation, picked by a byte permute; whole
    # rows of group pairs a tile, or the next tile prefetched (benchmarks/NOTES.md, rounds 9-10)
    decode_config(n, t, j, False, warps, 4, select_x=True, prefetch=prefetch)
    for t in (1, 2, 4)
    for n, j, warps, prefetch in ((4, 256, 4, False), (8, 256, 4, False), (4, 128, 2, False), (8, 128, 2, False),
                                  (16, 64, 4, False), (16, 32, 2, False), (8, 64, 4, True), (16, 64, 4, True),
                                  (16, 32, 2, True), (16, 64, 2, True), (8, 128, 4, True), (8, 32, 1, True),
                                  (4, 128, 4, False), (4, 64, 1, False))  # the last two: round 12, H100
    if n * j * t <= 64 * 32 * warps
]
# (The FMA body's reduction runs its combine function per element there: the tensor-core body is
# the fast one to simulate; tests run the FMA body on small tiles explicitly.)
INTERPRETER_CONFIGS = {
    "prefill": prefill_config(16, 16, 32, False, 4, 1, 8),
    "decode": decode_config(16, 16, 16, True, 4, 1),
    "decode_split": decode_config(16, 16, 16, True, 4, 1),
}


def token_block(tokens: int) -> int:
    return min(16, triton.next_power_of_2(max(1, int(tokens))))


def candidates(path: str, rows: int, cols: int, tokens: int, groups: int, v: int) -> list[triton.Config]:
    """The configs of `path` worth timing for this shape (the same list the benchmark times)."""
    if path == "prefill":
        if tokens <= ROW_MAJOR_MAX_TOKENS:
            block_t = (16, 16)
        else:
            block_t = (64, max(64, triton.next_power_of_2(tokens)))
        return [c for c in PREFILL_CONFIGS
                if c.kwargs["BLOCK_N"] <= v and block_t[0] <= c.kwargs["BLOCK_T"] <= block_t[1]]
    block_t = token_block(tokens)
    return [c for c in DECODE_CONFIGS if c.kwargs["BLOCK_N"] <= v and c.kwargs["BLOCK_J"] <= max(16, groups)
            and (c.kwargs["USE_DOT"] or c.kwargs["BLOCK_T"] == block_t)]


def gpu_slug(name: str | torch.device | None = None) -> str:
    """File-name form of a GPU's name, e.g. 'nvidia-h200'; a device (default: the current CUDA
    device) is looked up; devices other than CUDA have no tables ('cpu')."""
    if name is None or isinstance(name, torch.device):
        if name is not None and name.type != "cuda":
            return "cpu"
        return _cuda_slug(torch.cuda.current_device() if name is None or name.index is None else name.index)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def _cuda_slug(index: int) -> str:
    return gpu_slug(torch.cuda.get_device_name(index))


def table_key(rows: int, cols: int, bucket: int, v: int, m: int, dtype: torch.dtype | str) -> str:
    return f"{rows}x{cols} t{bucket} {v}:2:{m} {str(dtype).replace('torch.', '')}"


@functools.cache
def load_table(slug: str) -> dict:
    """The shipped table for this GPU merged with this machine's own tuning results."""
    table: dict = {"autotune": {}, "dispatch": {}, "rules": {}}
    for path in (TABLES / f"{slug}.json", USER_CACHE / f"{slug}.json"):
        if path.exists():
            data = json.loads(path.read_text())
            for section in table:
                table[section].update(data.get(section, {}))
    return table


def config_record(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _prune(path: str):
    def prune(configs, named_args, **kwargs):
        if interpreting():
            return [INTERPRETER_CONFIGS[path]]
        rows, cols, groups, m = (named_args[k] for k in ("R", "C", "G", "M"))
        tokens = planned_count(named_args["T"])  # symbolic where Inductor traces a dynamic-shape graph
        x = next(iter(named_args.values()))  # the activations: their dtype is the key's (as Triton's)
        key = f"{path} " + table_key(rows, cols, named_args["TOKEN_BUCKET"], kwargs["V"], m, x.dtype)
        known = load_table(gpu_slug(x.device))["autotune"].get(key)
        # configs arrive as copies: matched by the fields a candidate records (the same for all), in one pass
        records = [config_record(c) for c in candidates(path, rows, cols, tokens, groups, kwargs["V"])]
        fields = tuple(records[0]) if records else ()
        wanted = {_fields_of(record, fields) for record in records}
        fitting = [c for c in configs if _fields_of(config_record(c), fields) in wanted]
        chosen = [c for c in fitting if known is not None and _same(c, known)]
        if chosen:  # a recorded config is used only if it fits (BLOCK_N must divide V)
            return chosen[:1]
        fitting = fitting or configs[:1]
        return fitting if os.environ.get("VNM_AUTOTUNE", "1") != "0" else fitting[:1]
    return prune


def _fields_of(record: dict, fields: tuple[str, ...]) -> tuple:
    return tuple(record.get(name) for name in fields)


def _same(config: triton.Config, record: dict) -> bool:
    """Whether `config` is the recorded one (ignoring keys that heuristics add, like EVEN_K)."""
    return _fields_of(config_record(config), tuple(record)) == tuple(record.values())


def _autotuned(path: str, kernel, configs: list[triton.Config]):
    return triton.autotune(configs=configs, key=KEY, prune_configs_by={"early_config_prune": _prune(path)})(kernel)


# One autotuner per path. "decode_split" is the decode kernel with SPLIT_K = 4 (each split's fp32
# partial sums stored apart, then added), for shapes with too few row tiles.
AUTOTUNED = {
    "decode": _autotuned("decode", vnm_decode_kernel, DECODE_CONFIGS),
    "decode_split": _autotuned("decode_split", vnm_decode_kernel, DECODE_CONFIGS),
    "prefill": _autotuned("prefill", vnm_prefill_kernel, PREFILL_CONFIGS),
}
_tuned_seen = 0


def remember_tuned() -> None:
    """Save configs that Triton just tuned (keys not in any table) to this machine's cache."""
    global _tuned_seen
    tuned = sum(len(kernel.cache) for kernel in AUTOTUNED.values())
    if tuned == _tuned_seen or interpreting() or not torch.cuda.is_available():
        return
    _tuned_seen = tuned
    slug = gpu_slug()
    table = load_table(slug)
    new = {}
    for path, kernel in AUTOTUNED.items():
        for key, config in kernel.cache.items():
            rows, cols, bucket, v, m = key[:5]
            name = f"{path} " + table_key(rows, cols, bucket, v, m, key[5])
            if name not in table["autotune"]:
                new[name] = {k: val for k, val in config_record(config).items() if k != "EVEN_K"}
    if not new:
        return
    path = USER_CACHE / f"{slug}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved.setdefault("autotune", {}).update(new)
    USER_CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=1, sort_keys=True))
    table["autotune"].update(new)
