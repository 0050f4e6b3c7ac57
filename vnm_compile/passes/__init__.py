"""The stages of the vnm passes, one per module, run in this order by vnm_compile.pipeline."""

from .discover import discover
from .fold import fold
from .layout import layout
from .permute import permute
from .score import score
from .sparsify import sparsify
from .verify import verify

__all__ = ["discover", "fold", "layout", "permute", "score", "sparsify", "verify"]
