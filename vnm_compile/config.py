"""VNMConfig: every knob of the V:N:M pipeline, validated once, on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

CRITERIA = ("abs", "wanda", "ria")
METHODS = ("mask", "sparsegpt")
COLUMN_RULES = ("optimal", "l1")
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
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


@dataclass(frozen=True)
class VNMConfig:
    """What to sparsify and how. Field names are the `options=` keys of the "vnm" backend.

    method: "mask" prunes by the criterion's scores; "sparsegpt" also updates the kept weights from
    calibration statistics (one-shot reconstruction).
    skip: glob patterns of module names (`lm_head`, `*.attn.*`) that stay dense.
    only / exclude: glob patterns for bisecting by hand: with `only`, just the linears that match
    one of them are sparsified; `exclude` keeps its matches dense, like `skip`. A pattern matches
    the full module name or its tail (`mlp.*` matches `model.layers.0.mlp.up_proj`).
    min_features: a linear with fewer input or output features than this stays dense.
    dtypes: weight dtypes that are sparsified; others stay dense.
    permute_budget_s: wall-clock seconds the permutation search may take in all.
    max_layer_error: a layer whose estimated relative output error (from the activation norms)
    exceeds this stays dense; None keeps every eligible layer sparse.
    inductor: lower the rewritten graph with Inductor (False runs it as a plain FX graph).
    mode: Inductor's torch.compile mode for the lowering ("reduce-overhead" replays CUDA graphs);
    `torch.compile(model, backend="vnm", mode=...)` sets it too.
    fuse: linears that read the same input (q/k/v, gate/up) run as one vnm.linear on their
    row-concatenated weights, then split, where V divides every part's rows.
    prefill_layout: keep each weight's prefill layout (`prefill_layout`, 4/M of the dense weight's
    bytes) next to it, so the prefill kernel does not rebuild it per call; None keeps it where the
    kernels run (CUDA), True everywhere, False nowhere.
    keep_dense: keep the masked weight in dense form too (the dense bytes), so the dispatcher may
    run cuBLAS where it measured dense faster than the sparse kernels.
    refine_steps: block-wise refinement, for the block-by-block path (`compress_sequential`) only:
    after a block's linears are compressed, this many Adam steps (one calibration batch each) train
    their kept weights, masks fixed, to match the dense model's block outputs; 0 turns it off.
    `sparsify`, which compresses layer by layer, rejects refine_steps > 0.
    refine_lr: the Adam learning rate of that refinement (decayed to zero along a cosine).
    refine_batch: calibration inputs whose gradients each refinement step averages (one short
    input per step follows its noise).
    """

    v: int = 64
    m: int = 8
    criterion: str = "ria"
    a: float = 0.5
    method: str = "mask"
    column_select: str = "optimal"
    permute: bool = True
    permute_rounds: int = 2
    sparsify: bool = True
    verify: bool = False
    skip: tuple[str, ...] = field(default_factory=tuple)
    allow_small_v: bool = False
    min_features: int = 64
    dtypes: tuple[str, ...] = WEIGHT_DTYPE_NAMES
    permute_budget_s: float = 600.0
    max_layer_error: float | None = None
    inductor: bool = True
    only: tuple[str, ...] = field(default_factory=tuple)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    mode: str = "default"
    fuse: bool = True
    prefill_layout: bool | None = None
    keep_dense: bool = False
    refine_steps: int = 0
    refine_lr: float = 3e-3
    refine_batch: int = 1

    def __post_init__(self) -> None:
        check_pattern(self.v, self.m, self.allow_small_v)
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} (plain masking or one-shot reconstruction), "
                             f"got {self.method!r}")
        if not isinstance(self.a, (int, float)) or isinstance(self.a, bool) or not 0.0 <= self.a <= 4.0:
            raise ValueError(f"a (RIA activation exponent) must be a number in [0, 4], got {self.a!r}")
        if self.column_select not in COLUMN_RULES:
            raise ValueError(f"column_select must be one of {COLUMN_RULES}, got {self.column_select!r}")
        for name in ("permute", "sparsify", "verify", "allow_small_v", "inductor", "fuse", "keep_dense"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.permute_rounds, int) or isinstance(self.permute_rounds, bool) or not 0 <= self.permute_rounds <= 100:
            raise ValueError(f"permute_rounds must be an integer in [0, 100], got {self.permute_rounds!r}")
        for name in ("skip", "only", "exclude"):
            value = getattr(self, name)
            patterns = (value,) if isinstance(value, str) else value
            if not isinstance(patterns, (tuple, list)) or not all(isinstance(p, str) and p for p in patterns):
                raise ValueError(f"{name} must be a list of glob patterns (non-empty strings), got {value!r}")
            object.__setattr__(self, name, tuple(patterns))
        if not isinstance(self.min_features, int) or isinstance(self.min_features, bool) or self.min_features < 0:
            raise ValueError(f"min_features must be a non-negative integer, got {self.min_features!r}")
        dtypes = (self.dtypes,) if isinstance(self.dtypes, str) else self.dtypes
        if not isinstance(dtypes, (tuple, list)) or not dtypes or any(d not in WEIGHT_DTYPE_NAMES for d in dtypes):
            raise ValueError(f"dtypes must be a non-empty list drawn from {WEIGHT_DTYPE_NAMES}, got {self.dtypes!r}")
        object.__setattr__(self, "dtypes", tuple(dtypes))
        if not _is_positive_number(self.permute_budget_s):
            raise ValueError(f"permute_budget_s must be a positive number of seconds, got {self.permute_budget_s!r}")
        if self.max_layer_error is not None and not _is_positive_number(self.max_layer_error):
            raise ValueError(f"max_layer_error must be None or a positive number, got {self.max_layer_error!r}")
        if not isinstance(self.refine_steps, int) or isinstance(self.refine_steps, bool) or self.refine_steps < 0:
            raise ValueError(f"refine_steps must be a non-negative integer (Adam steps per block), got {self.refine_steps!r}")
        if not isinstance(self.refine_batch, int) or isinstance(self.refine_batch, bool) or self.refine_batch < 1:
            raise ValueError(f"refine_batch must be a positive integer (calibration inputs per step), got {self.refine_batch!r}")
        if not _is_positive_number(self.refine_lr) or self.refine_lr >= 1:
            raise ValueError(f"refine_lr must be a number in (0, 1) (Adam learning rate), got {self.refine_lr!r}")
        if self.mode not in INDUCTOR_MODES:
            raise ValueError(f"mode must be one of {INDUCTOR_MODES} (Inductor's torch.compile modes), got {self.mode!r}")
        if self.prefill_layout is not None and not isinstance(self.prefill_layout, bool):
            raise ValueError(f"prefill_layout must be None (on CUDA), True or False, got {self.prefill_layout!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "VNMConfig":
        """Build from a `torch.compile(..., options=...)` dict; unknown keys are errors, not ignored."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown vnm option(s) {unknown}; known options are {sorted(known)}")
        return cls(**options)
