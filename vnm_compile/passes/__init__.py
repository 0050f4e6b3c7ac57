"""The passes of the vnm backend, one stage per module, run in this order (see vnm_compile.backend)."""

from .discover import discover
from .fold import fold
from .layout import channel_major_layouts
from .permute import permute
from .score import score
from .sparsify import sparsify
from .verify import verify

__all__ = ["channel_major_layouts", "discover", "fold", "permute", "score", "sparsify", "verify"]
