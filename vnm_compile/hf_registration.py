"""Registering the "vnm" quantization method with transformers, so that `from_pretrained` restores
V:N:M checkpoints; imported by `import vnm_compile`, so it loads nothing heavy (not torch, not
transformers)."""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings
from collections.abc import Callable
from typing import Any


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback` right after the module `name` is executed (and then leaves sys.meta_path).

    It finds the module as the other finders do and wraps the loader of what they find; a caller that
    only looks for the module (importlib.util.find_spec) executes nothing, so the finder stays.
    """

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        others = (finder for finder in sys.meta_path if finder is not self and hasattr(finder, "find_spec"))
        spec = next((spec for finder in others if (spec := finder.find_spec(fullname, path, target))), None)
        if spec is None:
            return None
        if not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_call(module: Any) -> None:
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            self.callback()

        spec.loader.exec_module = exec_then_call
        return spec


_QUANTIZER_REGISTRY = "transformers.quantizers.auto"


def _register() -> None:
    try:
        importlib.import_module("vnm_compile.hf_quantizer")  # registers on import
    except Exception as error:  # never break the user's import of transformers
        warnings.warn(f"vnm-compile could not register its quantizer with transformers ({error!r}): "
                      "from_pretrained will not restore V:N:M checkpoints", stacklevel=2)


def register_with_transformers() -> None:
    """Register the "vnm" quantization method with transformers: now if its quantizer registry is
    loaded, else right after transformers loads it (importing transformers here would slow down
    `import vnm_compile` by seconds, and transformers is optional)."""
    if _QUANTIZER_REGISTRY in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(_QUANTIZER_REGISTRY, _register))

