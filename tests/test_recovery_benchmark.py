"""benchmarks/recovery.py: its time limit shared among the training runs, and text sampled from the dense
model mixed into the training text."""

import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
from benchmarks.recovery import GENERATED_PROMPT, _Pace, with_generated_text  # noqa: E402


@pytest.mark.parametrize("curve_seconds_per_token, expected", [(0.0, 100_000), (1e-3, 50_000)])
def test_tokens_fit_the_deadline_with_the_curve_evaluations(curve_seconds_per_token, expected):
    pace = _Pace(time.perf_counter() + 100.0, training_recipes=1, evaluation_seconds=0.0,
                 curve_seconds_per_token=curve_seconds_per_token)
    pace.seconds_per_token = 1e-3
    tokens = pace.tokens(10**9, patterns_left=1, reconstruction_seconds=0.0)
    assert 0.99 * expected < tokens <= expected


def tiny_model_and_batches():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, eos_token_id=0)
    torch.manual_seed(0)
    corpus = torch.randint(1, 96, (12, 24))
    batches = [{"input_ids": corpus[i : i + 4]} for i in range(0, 12, 4)]
    return transformers.LlamaForCausalLM(config).eval(), corpus, batches


def test_generated_windows_continue_training_prompts_and_mix_with_the_corpus():
    model, corpus, batches = tiny_model_and_batches()
    mixed = with_generated_text(model, batches, tokens=100, generate_batch=3)  # 5 windows of 24 tokens
    windows = torch.cat([b["input_ids"] for b in mixed])
    assert all(b["input_ids"].shape == (4, 24) for b in mixed) and windows.shape[0] == 16  # 17 windows, whole batches
    known = {tuple(row.tolist()) for row in corpus}
    kept = [row for row in windows if tuple(row.tolist()) in known]
    generated = [row for row in windows if tuple(row.tolist()) not in known]
    assert len(kept) >= 11 and len(generated) >= 4
    prompts = {tuple(row[:GENERATED_PROMPT].tolist()) for row in corpus}
    assert all(tuple(row[:GENERATED_PROMPT].tolist()) in prompts for row in generated)
    positions = [i for i, row in enumerate(windows) if tuple(row.tolist()) not in known]
    assert positions != list(range(len(kept), len(windows)))  # shuffled in, not appended


def test_generated_cache_is_written_once_then_read(tmp_path, monkeypatch):
    """The first run samples and writes the cache; a run asking for as many tokens or fewer reads it
    and samples nothing (the same mix), one asking for more samples anew."""
    model, _, batches = tiny_model_and_batches()
    cache = tmp_path / "sampled.pt"
    first = with_generated_text(model, batches, tokens=100, generate_batch=3, cache=cache)
    assert torch.load(cache).shape == (5, 24)

    def refuse(*args, **kwargs):
        raise AssertionError("sampled although the cache holds enough windows")

    monkeypatch.setattr(model, "generate", refuse)
    again = with_generated_text(model, batches, tokens=100, generate_batch=3, cache=cache)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again, strict=True))
    assert len(with_generated_text(model, batches, tokens=48, cache=cache)) == 3  # 12 + 2 windows: 3 batches
    with pytest.raises(AssertionError, match="sampled although"):
        with_generated_text(model, batches, tokens=200, cache=cache)
