import pytest
import torch

import vnm_compile as vnm
from vnm_compile.reconstruct import HessianAccumulator, reconstruct
from vnm_compile.sequential import compress_sequential

transformers = pytest.importorskip("transformers")


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=101, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def token_batches(count: int = 3, length: int = 19) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 101, (1, length), generator=generator) for _ in range(count)]


def test_first_llama_block_matches_one_shot_reconstruction():
    model, batches = tiny_llama(), token_batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = vnm.VNMConfig(v=16, m=6, method="sparsegpt", allow_small_v=True, min_features=16)
    compressed = compress_sequential(model, batches, config, progress=False)

    block_linears = {f"model.layers.{i}.{name}" for i in range(2) for name in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(compressed) == block_linears  # not the lm_head, nothing outside the blocks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched

    # The first block sees the dense model's activations, so its result is the one-shot result.
    with torch.no_grad(), HessianAccumulator(model) as stats:
        for batch in batches:
            model(batch)
    hessians = stats.hessians()
    for name in sorted(block_linears):
        weight = model.get_submodule(name).weight
        expected, mask = reconstruct(weight, hessians[name], 16, 6)
        got = compressed[name]
        assert vnm.is_vnm(got.mask(), 16, 6)
        if name.startswith("model.layers.0."):
            assert torch.equal(got.mask(), mask)
            torch.testing.assert_close(got.to_dense(), expected, rtol=1e-5, atol=1e-6)
        elif name.endswith("q_proj"):
            # Later blocks see the compressed blocks' outputs instead.
            assert not torch.allclose(got.to_dense(), expected, rtol=1e-3, atol=1e-4)


def test_bert_mask_criterion_uses_norms_of_the_compressed_prefix():
    model = tiny_bert()
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in token_batches()]
    config = vnm.VNMConfig(v=16, m=5, criterion="wanda", allow_small_v=True, min_features=16,
                           skip=("*.attention.output.dense",))
    compressed = compress_sequential(model, batches, config, progress=False)
    assert len(compressed) == 2 * 5 and not any(name.endswith("attention.output.dense") for name in compressed)

    dense_norms = vnm.activation_norms(model, batches)
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense"):
        weight = model.get_submodule(name).weight
        scores = vnm.importance(weight, "wanda", dense_norms[name])
        assert torch.equal(compressed[name].mask(), vnm.vnm_mask(scores, 16, 5))
        assert torch.equal(compressed[name].to_dense(), weight * compressed[name].mask())


def test_compressed_prefix_feeds_the_next_block():
    # Compressing block 0 by hand and taking block 1's input norms from that model must reproduce
    # the sequential result for block 1.
    model, batches = tiny_llama(), token_batches()
    config = vnm.VNMConfig(v=16, m=8, criterion="ria", allow_small_v=True, min_features=16)
    compressed = compress_sequential(model, batches, config, progress=False)
    for name, weight in compressed.items():
        if name.startswith("model.layers.0."):
            model.get_submodule(name).weight.data = weight.to_dense()
    norms = vnm.activation_norms(model, batches)
    name = "model.layers.1.mlp.down_proj"
    scores = vnm.importance(model.get_submodule(name).weight, "ria", norms[name])
    assert torch.equal(compressed[name].mask(), vnm.vnm_mask(scores, 16, 8))


def test_gpt2_conv1d_weights_are_compressed_out_by_in():
    config = transformers.GPT2Config(vocab_size=101, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model, batches = transformers.GPT2LMHeadModel(config).eval(), token_batches()
    compressed = compress_sequential(model, batches, vnm.VNMConfig(v=16, m=5, method="sparsegpt",
                                                                   allow_small_v=True, min_features=16), progress=False)
    assert set(compressed) == {f"transformer.h.{i}.{part}" for i in range(2)
                               for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    with torch.no_grad(), HessianAccumulator(model, (transformers.pytorch_utils.Conv1D,)) as stats:
        for batch in batches:
            model(batch)
    name = "transformer.h.0.mlp.c_fc"
    weight = model.get_submodule(name).weight.detach().t()  # Conv1D stores in x out
    expected, mask = reconstruct(weight, stats.hessians()[name], 16, 5)
    assert compressed[name].shape == (192, 48) and torch.equal(compressed[name].mask(), mask)
    torch.testing.assert_close(compressed[name].to_dense(), expected, rtol=1e-5, atol=1e-6)


def test_rejects_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="config"):
        compress_sequential(model, token_batches(), {"v": 16}, progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        compress_sequential(model, [], vnm.VNMConfig(v=16, m=4, allow_small_v=True, min_features=16), progress=False)
    with pytest.raises(ValueError, match="repeated blocks"):
        compress_sequential(torch.nn.Linear(4, 4), token_batches(), vnm.VNMConfig(), progress=False)


class _MLPWithTiny(torch.nn.Module):
    """Llama's MLP plus an 8x8 linear (`tiny`) on its input's first channels."""

    def __init__(self, mlp):
        super().__init__()
        self.inner, self.tiny = mlp, torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.inner(x) + torch.nn.functional.pad(self.tiny(x[..., :8]), (0, x.shape[-1] - 8))


def test_block_path_and_passes_choose_the_same_linears():
    """skip, exclude, only and min_features mean the same in compress_sequential as in the passes."""
    model = tiny_llama()
    for layer in model.model.layers:
        layer.mlp = _MLPWithTiny(layer.mlp)
    config = vnm.VNMConfig(v=16, m=8, criterion="abs", allow_small_v=True, skip=["*.up_proj", "lm_head"],
                           exclude=["*.tiny"], min_features=40, permute=False)
    by_blocks = set(compress_sequential(model, token_batches(), config, progress=False))
    vnm.sparsify(model, (token_batches()[0],), config)
    by_passes = {layer.name for layer in vnm.reports()[-1].sparse_layers}
    assert by_blocks == by_passes
    assert by_passes and not any("up_proj" in name or "tiny" in name for name in by_passes)
    assert not any(name.endswith(("k_proj", "v_proj")) for name in by_passes)  # 24 outputs < min_features


@pytest.mark.parametrize("pattern,n,m", [("nm", 2, 4), ("transposable", 2, 4), ("nm", 4, 8), ("transposable", 4, 8)])
@pytest.mark.parametrize("method", ["mask", "sparsegpt"])
def test_block_path_makes_nm_and_transposable_models(pattern, n, m, method):
    """The block-by-block path compresses to plain or transposable N:M (masked dense weights) by every
    method: each mask has n of every m per row (and per column of every m x m block when transposable);
    reconstruction keeps the model's output closer than masking alone."""
    from vnm_compile.transposable import is_transposable

    model, batches = tiny_llama(), token_batches()
    config = vnm.VNMConfig(v=16, m=m, n=n, pattern=pattern, method=method, criterion="wanda", allow_small_v=True,
                           min_features=16)
    compressed = compress_sequential(model, batches, config, progress=False)
    assert compressed
    for name, weight in compressed.items():
        mask = weight.mask()
        assert torch.equal(weight.to_dense() != 0, mask & (weight.to_dense() != 0))  # zero off the mask
        rows = mask[:, : mask.shape[1] // m * m].reshape(mask.shape[0], -1, m).sum(-1)
        assert bool((rows == n).all()), name
        if pattern == "transposable":
            assert is_transposable(mask, n, m), name
    with pytest.raises(ValueError, match="makes masked dense weights"):
        vnm.sparsify(model, token_batches()[0], config)
