"""V:N:M linear kernels: the torch.library operators, the Triton kernels, the CPU reference.

The Triton modules are imported on first use, not here: under TRITON_INTERPRET=1 Triton decides
at a kernel's definition whether it is compiled or interpreted, so a process that wants the
interpreter (CPU tests) sets it before the first kernel runs.
"""

from .op import PrefillLayout, check_inputs, cusparselt_refusal, cusparselt_weight, operands, prefill_layout, vnm_linear
from .operands import Operands
from .reference import reference_linear

__all__ = ["Operands", "PrefillLayout", "check_inputs", "cusparselt_refusal", "cusparselt_weight", "operands",
           "prefill_layout", "reference_linear", "vnm_linear"]
