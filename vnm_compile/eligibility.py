"""Which linears are sparsified: the one rule every entry applies (the backend's discover pass,
`vnm.sparsify`, `compress_sequential`, `explain`, `bisect`)."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import VNMConfig


def matches(name: str, pattern: str) -> bool:
    """A module-name glob matches the whole name or a dotted tail of it."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def skip_reason(name: str, out_features: int, in_features: int, dtype: torch.dtype, config: VNMConfig,
                extra_skips: dict[str, str] | None = None) -> str | None:
    """Why the linear `name` (out x in, weight dtype) stays dense under `config`, or None if it is
    sparsified. extra_skips: names the caller keeps dense, with the reason."""
    for field_name in ("skip", "exclude"):
        for pattern in getattr(config, field_name):
            if matches(name, pattern):
                return f"matches {field_name} pattern {pattern!r}"
    if config.only and not any(matches(name, pattern) for pattern in config.only):
        return f"matches no pattern of only={list(config.only)}"
    if extra_skips and name in extra_skips:
        return extra_skips[name]
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in config.dtypes:
        return f"weight dtype {dtype_name} is not in dtypes {list(config.dtypes)}"
    if min(out_features, in_features) < config.min_features:
        return f"{out_features}x{in_features} is smaller than min_features={config.min_features}"
    return None
