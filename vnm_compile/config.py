"""VNMConfig: every knob of the V:N:M pipeline, validated once, on construction."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CRITERIA = ("abs", "wanda", "ria")
PATTERNS = ("vnm", "nm", "transposable")
COLUMN_RULES = ("optimal", "l1")
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Devices whose sparse linears a graph for a bucket of small token counts runs faster than the dynamic
# graph (CUDA: the kernels launched by Inductor, not chosen per call; on the CPU both run the reference).
SMALL_TOKEN_GRAPH_DEVICES = ("cuda",)
WEIGHT_DTYPE_NAMES = ("float32", "float16", "bfloat16")  # what the kernels take
SMALLEST_V = 16
LARGEST_M = 256  # column indices inside a group are stored as uint8


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _is_positive_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf")


def check_pattern(v: Any, m: Any, allow_small_v: bool = False) -> None:
    """Raise ValueError, naming the parameter, unless (v, m) is a usable V:N:M pattern."""
    smallest = 1 if allow_small_v else SMALLEST_V
    if not isinstance(v, int) or isinstance(v, bool) or not _is_power_of_two(v) or v < smallest:
        raise ValueError(
            f"v must be a power of two >= {smallest} (the kernel's tile rows), got {v!r}"
            + ("" if allow_small_v else "; pass allow_small_v=True for smaller blocks in tests")
        )
    if not isinstance(m, int) or isinstance(m, bool) or not 4 <= m <= LARGEST_M:
        raise ValueError(f"m must be an integer in [4, {LARGEST_M}] (4 kept columns of m), got {m!r}")


def _check_integer(name: str, value: Any, low: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low} ({what}), got {value!r}")


@dataclass(frozen=True)
class Refinement:
    """Block-wise refinement after one-shot compression, for the block-by-block path
    (`compress_sequential`): `steps` Adam steps a block (one calibration batch each, `batch` inputs'
    gradients averaged) train its kept weights, masks fixed, towards the dense model's block outputs;
    `lr` decays to zero along a cosine."""

    steps: int = 64
    lr: float = 3e-3
    batch: int = 1

    def __post_init__(self) -> None:
        _check_integer("refine.steps", self.steps, 1, "Adam steps per block")
        _check_integer("refine.batch", self.batch, 1, "calibration inputs per step")
        if not _is_positive_number(self.lr) or self.lr >= 1:
            raise ValueError(f"refine.lr must be a number in (0, 1) (Adam learning rate), got {self.lr!r}")


@dataclass(frozen=True)
class VNMConfig:
    """What to sparsify and how. Field names are the `options=` keys of the "vnm" backend.

    The pattern and the mask:
      v, m: the V:N:M pattern (v rows share 4 kept columns of every m; each row keeps 2 of them).
      pattern: "vnm" (the default, what the kernels run), or, for the block-by-block path
        (`compress_sequential`), "nm" (n of every m in each row) or "transposable" (n per row and per
        column of every m x m block, so W and W^T are both N:M: a sparse backward), kept as masked
        dense weights; n: their kept count (2 for "vnm").
      criterion: importance of a weight, "abs", "wanda" or "ria"; ria_exponent: RIA's power of the
        input channel norms.
      column_select: "optimal" (exhaustive per block) or "l1" (the paper's rule).
      method: a registered compression method (`vnm_compile.compression`): "mask" prunes by the
        criterion's scores; "sparsegpt" also updates the kept weights from calibration statistics.
      refine: a `Refinement` (block-by-block path only), or None.
    Which linears (`vnm_compile.eligibility`): skip / exclude: glob patterns of module names kept dense
      (a pattern matches the full name or its tail: `mlp.*` matches `model.layers.0.mlp.up_proj`);
      only: if given, just the matching linears are sparsified; min_features: fewer input or output
      features keep a linear dense; dtypes: weight dtypes that are sparsified; max_layer_error: a
      layer whose estimated relative output error exceeds it stays dense (None: no limit).
    The permutation search: permute (on/off), permute_rounds, permute_budget_s (wall-clock seconds in all).
    The graph passes: sparsify (False runs discover/permute/fold only: the output equals the
      original's), verify (check the rewritten graphs node by node).
    Lowering (the backend): inductor (False runs the rewritten FX graph as it is); mode: Inductor's
      torch.compile mode ("reduce-overhead" replays CUDA graphs; `torch.compile(..., mode=...)` sets it
      too); fuse: linears reading one input (q/k/v, gate/up) run as one vnm.linear where V divides
      their rows; prefill_layout: keep each weight's prefill layout (4/M of its dense bytes) beside it
      (None: where the kernels run, CUDA); keep_dense: keep the masked weight dense too, so the
      dispatcher may run cuBLAS where it measured faster (the dense bytes); keep_cusparselt: keep a
      cuSPARSELt copy where cuSPARSELt takes the weight (`kernels.cusparselt_refusal`: M a multiple of
      4, both dims of 16; about 0.56 of the dense bytes), which the dispatcher runs on many tokens
      where it wins; sparse_mma_layout: keep each weight's layout for the sparse tensor-core kernel
      (`kernels.sparse_mma`; about the compressed bytes again; v a multiple of 16, fp16/bf16, compute
      capability 8.0+) (None: where this GPU's dispatch table measured that kernel faster for the
      weight's shape at some token count); small_tokens: a dynamic-shape graph (Dynamo's, after a second input
      shape) runs the token counts up to this many in graphs of their own, one per power-of-two
      bucket (2, 3-4, 5-8, ...), compiled when a count of the bucket is first seen, where Inductor
      launches the kernels chosen for the bucket directly; larger counts run the dynamic graph, which
      launches the kernels planned for many tokens (0: the dynamic graph only, choosing kernels per
      call; modes that replay CUDA graphs need none: a replay skips the per-call work).
    allow_small_v: accept v < 16 (tests).
    """

    v: int = 64
    m: int = 8
    pattern: str = "vnm"
    n: int = 2
    criterion: str = "ria"
    ria_exponent: float = 0.5
    column_select: str = "optimal"
    method: str = "mask"
    refine: Refinement | None = None
    skip: tuple[str, ...] = field(default_factory=tuple)
    only: tuple[str, ...] = field(default_factory=tuple)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    min_features: int = 64
    dtypes: tuple[str, ...] = WEIGHT_DTYPE_NAMES
    max_layer_error: float | None = None
    permute: bool = True
    permute_rounds: int = 2
    permute_budget_s: float = 600.0
    sparsify: bool = True
    verify: bool = False
    inductor: bool = True
    mode: str = "default"
    fuse: bool = True
    prefill_layout: bool | None = None
    keep_dense: bool = False
    keep_cusparselt: bool = False
    sparse_mma_layout: bool | None = None
    small_tokens: int = 16
    allow_small_v: bool = False

    def small_token_graphs(self, device: Any) -> int:
        """The token counts (1 to this) that a dynamic-shape graph's calls run in graphs of their own,
        per bucket, on `device`: small_tokens on CUDA, where such a graph launches the kernels from
        Inductor's code; 0 on other devices (both kinds of graph run the reference) and in the
        CUDA-graph modes (a replay skips the per-call work anyway)."""
        import torch
        from torch._inductor import list_mode_options

        if torch.device(device).type not in SMALL_TOKEN_GRAPH_DEVICES:
            return 0
        return 0 if list_mode_options(self.mode).get("triton.cudagraphs", False) else self.small_tokens

    def __post_init__(self) -> None:
        from .compression import method_names  # the registry imports this module

        check_pattern(self.v, self.m, self.allow_small_v)
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.pattern == "vnm" and self.n != 2:
            raise ValueError(f"n must be 2 for pattern='vnm' (V:2:M), got {self.n!r}")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 0 < self.n < self.m:
            raise ValueError(f"n must be an integer with 0 < n < m={self.m}, got {self.n!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.method not in method_names():
            raise ValueError(f"method must be one of {method_names()} (registered compression methods), "
                             f"got {self.method!r}")
        if (not isinstance(self.ria_exponent, (int, float)) or isinstance(self.ria_exponent, bool)
                or not 0.0 <= self.ria_exponent <= 4.0):
            raise ValueError(f"ria_exponent (RIA's power of the activation norms) must be a number in [0, 4], "
                             f"got {self.ria_exponent!r}")
        if self.column_select not in COLUMN_RULES:
            raise ValueError(f"column_select must be one of {COLUMN_RULES}, got {self.column_select!r}")
        if self.refine is not None and not isinstance(self.refine, Refinement):
            raise ValueError(f"refine must be None or a vnm_compile.Refinement, got {type(self.refine).__name__}")
        for name in ("permute", "sparsify", "verify", "allow_small_v", "inductor", "fuse", "keep_dense",
                     "keep_cusparselt"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        rounds = self.permute_rounds
        if not isinstance(rounds, int) or isinstance(rounds, bool) or not 0 <= rounds <= 100:
            raise ValueError(f"permute_rounds must be an integer in [0, 100], got {self.permute_rounds!r}")
        for name in ("skip", "only", "exclude"):
            value = getattr(self, name)
            patterns = (value,) if isinstance(value, str) else value
            if not isinstance(patterns, (tuple, list)) or not all(isinstance(p, str) and p for p in patterns):
                raise ValueError(f"{name} must be a list of glob patterns (non-empty strings), got {value!r}")
            object.__setattr__(self, name, tuple(patterns))
        _check_integer("min_features", self.min_features, 0, "features")
        dtypes = (self.dtypes,) if isinstance(self.dtypes, str) else self.dtypes
        if not isinstance(dtypes, (tuple, list)) or not dtypes or any(d not in WEIGHT_DTYPE_NAMES for d in dtypes):
            raise ValueError(f"dtypes must be a non-empty list drawn from {WEIGHT_DTYPE_NAMES}, got {self.dtypes!r}")
        object.__setattr__(self, "dtypes", tuple(dtypes))
        if not _is_positive_number(self.permute_budget_s):
            raise ValueError(f"permute_budget_s must be a positive number of seconds, got {self.permute_budget_s!r}")
        if self.max_layer_error is not None and not _is_positive_number(self.max_layer_error):
            raise ValueError(f"max_layer_error must be None or a positive number, got {self.max_layer_error!r}")
        if isinstance(self.small_tokens, bool) or not isinstance(self.small_tokens, int) or self.small_tokens < 0:
            raise ValueError(f"small_tokens must be an integer >= 0 (0: no graphs per bucket of small counts), "
                             f"got {self.small_tokens!r}")
        if self.mode not in INDUCTOR_MODES:
            raise ValueError(f"mode must be one of {INDUCTOR_MODES} (Inductor's torch.compile modes), "
                             f"got {self.mode!r}")
        if self.prefill_layout is not None and not isinstance(self.prefill_layout, bool):
            raise ValueError(f"prefill_layout must be None (on CUDA), True or False, got {self.prefill_layout!r}")
        if self.sparse_mma_layout is not None and not isinstance(self.sparse_mma_layout, bool):
            raise ValueError(f"sparse_mma_layout must be None (where measured faster), True or False, "
                             f"got {self.sparse_mma_layout!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> VNMConfig:
        """Build from a `torch.compile(..., options=...)` dict; unknown keys are errors, not ignored."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown vnm option(s) {unknown}; known options are {sorted(known)}")
        return cls(**options)
