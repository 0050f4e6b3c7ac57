"""The compiled-binary launcher's host-side decisions (the launches themselves: GPU tests of dispatch)."""

import torch
import triton

from vnm_compile.kernels.launcher import launch_hooks_installed, specialization


def test_no_hook_by_default_and_an_added_one_is_seen(monkeypatch):
    """Triton's default hooks (None, or an empty chain in recent versions) take the fast launch; a
    profiler's hook, added to the chain or set outright, takes Triton's own launch."""
    runtime = triton.knobs.runtime
    assert not launch_hooks_installed()
    hook = lambda *args: None
    chain = runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
        try:
            assert launch_hooks_installed()
        finally:
            chain.remove(hook)
        assert not launch_hooks_installed()
    monkeypatch.setattr(runtime, "launch_exit_hook", hook)
    assert launch_hooks_installed()


def test_specialization_follows_tritons_integer_and_alignment_rules():
    aligned = torch.empty(64, dtype=torch.float16)
    unaligned = aligned[1:]
    assert specialization([aligned, 1, 32, 7]) == (True, (True, False), (False, True), (False, False))
    assert specialization([unaligned]) == (False,)
