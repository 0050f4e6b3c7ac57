"""The vnm backend's fast-path plumbing on CPU: fused q/k/v and gate/up linears, the prefill layout
and dense weight passed to the op as graph buffers, Inductor's mode, and their config errors.

The fused graph must compute what the unfused one does (both through the op's reference on CPU),
and `verify=True` checks each fused output node against the masked dense linear it replaced.
"""

import logging

import pytest
import torch
from torch import nn

import vnm_compile as vnm
from vnm_compile.format import concat_rows

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SMALL = {"v": 16, "allow_small_v": True, "min_features": 16, "skip": ["lm_head"], "inductor": False, "verify": True}


def _llama(kv_heads=4):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def _compiled_logits(model, ids, **options):
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend="vnm", options={**SMALL, **options})
        logits = compiled(input_ids=ids, use_cache=False).logits
    return logits, vnm.reports()[-1]


def _sparse_code(report) -> str:
    return next(stage.after for stage in report.stages if stage.stage == "sparsify")


def test_fused_llama_matches_unfused_and_carries_layouts():
    torch.manual_seed(0)
    model = _llama()
    ids = torch.randint(0, 96, (2, 17))
    fused, fused_report = _compiled_logits(model, ids, m=8, fuse=True, prefill_layout=True, keep_dense=True)
    plain, plain_report = _compiled_logits(model, ids, m=8, fuse=False, prefill_layout=False)
    assert fused_report.verification.sparse_error < 1e-4 and plain_report.verification.sparse_error < 1e-4
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert fused.abs().max() > 0
    fused_code, plain_code = _sparse_code(fused_report), _sparse_code(plain_report)
    # per layer: q/k/v as one, o, gate/up as one, down = 4 calls, against 7 unfused
    assert fused_code.count("torch.ops.vnm.linear.default(") == 4
    assert plain_code.count("torch.ops.vnm.linear.default(") == 7
    calls = [line for line in fused_code.splitlines() if "torch.ops.vnm.linear.default(" in line]
    assert all("_dense" in line and "_expanded" in line and "_channels" in line for line in calls)
    assert not any("_expanded" in line or "_dense" in line for line in plain_code.splitlines()
                   if "torch.ops.vnm.linear.default(" in line)
    # every sparse layer still reports its own compressed weight
    assert len(fused_report.sparse_layers) == len(plain_report.sparse_layers) == 7


class TwoReaders(nn.Module):
    """Two linears on one input, and a third on another: an attention-free fusion site."""

    def __init__(self, rows=(64, 48), bias=(True, False)):
        super().__init__()
        self.a = nn.Linear(64, rows[0], bias=bias[0])
        self.b = nn.Linear(64, rows[1], bias=bias[1])
        self.c = nn.Linear(rows[0] + rows[1], 32)

    def forward(self, x):
        return self.c(torch.cat((torch.relu(self.a(x)), self.b(x)), dim=-1))


def _run(module, x, **options):
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(module, backend="vnm", options={**SMALL, "min_features": 16, **options})(x)
    return y, vnm.reports()[-1]


def test_mixed_bias_fuses_and_matches_masked_dense():
    torch.manual_seed(1)
    module, x = TwoReaders().eval(), torch.randn(3, 7, 64)
    fused, report = _run(module, x, m=8, permute=False)
    plain, _ = _run(module, x, m=8, permute=False, fuse=False)
    code = _sparse_code(report)
    assert code.count("torch.ops.vnm.linear.default(") == 2 and "fused_bias" in code
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    layers = {layer.name: layer for layer in report.layers}
    reference = torch.cat((torch.relu(x @ layers["a"].weight.to_dense().T + module.a.bias),
                           x @ layers["b"].weight.to_dense().T), -1)
    reference = reference @ layers["c"].weight.to_dense().T + module.c.bias
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


def test_prefill_layout_default_follows_the_device():
    torch.manual_seed(0)
    _, report = _run(TwoReaders().eval(), torch.randn(3, 64), m=8, permute=False)
    code = _sparse_code(report)
    assert "torch.ops.vnm.linear.default(" in code and "_expanded" not in code  # CPU: the reference reads none


def test_rows_that_v_does_not_divide_stay_unfused_with_a_reason(caplog):
    torch.manual_seed(2)
    module, x = TwoReaders(rows=(40, 48)).eval(), torch.randn(5, 64)
    with caplog.at_level(logging.INFO, logger="vnm_compile"):
        y, report = _run(module, x, m=5, permute=False)
    assert _sparse_code(report).count("torch.ops.vnm.linear.default(") == 3
    assert any("stay separate" in r.message and "does not divide" in r.message for r in caplog.records)
    plain, _ = _run(module, x, m=5, permute=False, fuse=False)
    torch.testing.assert_close(y, plain, rtol=1e-5, atol=1e-5)


def test_concat_rows_is_the_rows_side_by_side():
    torch.manual_seed(3)
    parts = [vnm.VNMWeight.from_dense(torch.randn(rows, 37), 16, 6) for rows in (32, 16, 23)]
    joined = concat_rows(parts)
    assert torch.equal(joined.to_dense(), torch.cat([p.to_dense() for p in parts]))
    x = torch.randn(4, 37)
    torch.testing.assert_close(vnm.vnm_linear(x, joined), torch.cat([vnm.vnm_linear(x, p) for p in parts], -1))
    with pytest.raises(ValueError, match="does not divide the 23 rows"):
        concat_rows([parts[2], parts[0]])
    with pytest.raises(ValueError, match="share v, m"):
        concat_rows([parts[0], vnm.VNMWeight.from_dense(torch.randn(16, 37), 16, 8)])


def test_sparse_tensor_core_layout_asked_where_the_kernel_cannot_run_is_left_out_with_a_reason(caplog):
    """The kernel takes fp16/bf16 weights on GPUs: asked for, its layout is logged as left out for a float32
    model, and for a float16 one on the CPU, and not kept."""
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 17))
    for dtype, reason in ((torch.float32, "takes float16 or bfloat16"), (torch.float16, "does not run on cpu")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vnm_compile"):
            _, report = _compiled_logits(_llama().to(dtype), ids, m=8, sparse_mma_layout=True)
        assert any("no sparse tensor-core layout" in r.message and reason in r.message for r in caplog.records)
        assert "_mma_values" not in _sparse_code(report)


@pytest.mark.parametrize("options, message", [
    ({"mode": "fast"}, "mode must be one of"),
    ({"prefill_layout": "yes"}, "prefill_layout must be None"),
    ({"sparse_mma_layout": 1}, "sparse_mma_layout must be None"),
    ({"fuse": 1}, "fuse must be True or False"),
    ({"keep_dense": None}, "keep_dense must be True or False"),
])
def test_bad_plumbing_options_raise_clearly(options, message):
    with pytest.raises(ValueError, match=message):
        vnm.VNMConfig.from_options(options)


def test_compile_mode_reaches_inductor(monkeypatch):
    """torch.compile's mode= (passed to the backend instead of options) becomes Inductor's config
    patches: "reduce-overhead" turns on its CUDA graphs."""
    import torch._inductor.compile_fx as inductor

    patches = []

    def compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        patches.append(config_patches)
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", compile_fx)
    torch.manual_seed(4)
    module, x = TwoReaders().eval(), torch.randn(2, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend="vnm", mode="reduce-overhead")(x)  # no options: all defaults
    assert vnm.reports()[-1].config.mode == "reduce-overhead"
    assert patches == [{"triton.cudagraphs": True}]
