import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import vnm_compile as vnm
from vnm_compile.recovery import masked_copy

_spec = importlib.util.spec_from_file_location(
    "accuracy_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py")
accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accuracy)


class Bigram(nn.Module):
    """Next-token logits are a fixed row of a table, chosen by the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def test_perplexity_of_a_bigram_model_is_its_closed_form():
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(7, 7, generator=generator)
    windows = torch.randint(0, 7, (3, 11), generator=generator)
    nll = 0.0
    for window in windows.tolist():
        for current, following in zip(window, window[1:]):
            row = table[current].tolist()
            nll -= row[following] - math.log(sum(math.exp(x) for x in row))
    expected = math.exp(nll / (3 * 10))
    assert math.isclose(accuracy.perplexity(Bigram(table), windows), expected, rel_tol=1e-9)
    assert math.isclose(accuracy.perplexity(Bigram(torch.zeros(7, 7)), windows), 7.0, rel_tol=1e-9)


def test_sparsity_counts_padding():
    weight = torch.randn(16, 10)  # 10 columns at m=8: the second group holds 2 columns and keeps both
    compressed = {"layer": vnm.VNMWeight.from_dense(weight, 16, 8)}
    assert math.isclose(accuracy.sparsity(compressed), 1 - (2 + 2) / 10)


def test_pydoc_split_is_disjoint_by_topic():
    from pydoc_data import topics

    calibration, evaluation = accuracy.pydoc_split()
    names = sorted(topics.topics)
    assert topics.topics[names[0]] in calibration and topics.topics[names[0]] not in evaluation
    assert topics.topics[names[1]] in evaluation and topics.topics[names[1]] not in calibration


class _Encoder(nn.Module):
    """Token states [batch, tokens, 32] from inputs x, as an encoder's last hidden state."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(32, 64), nn.Linear(64, 32)])

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.layers[1](torch.relu(self.layers[0](x)))


def test_distill_to_sentence_embeddings_raises_their_cosine_to_dense():
    torch.manual_seed(0)
    model = _Encoder()
    masks = [torch.ones(2, 7, dtype=torch.long) for _ in range(8)]
    for mask in masks:
        mask[1, 4:] = 0  # padding: left out of the pooled embedding
    batches = [{"x": torch.randn(2, 7, 32), "attention_mask": mask} for mask in masks]
    task = type("CalibrationOnly", (), {"batches": batches})()
    weights = {name: vnm.VNMWeight.from_dense(model.get_submodule(name).weight.detach(), 16, 8)
               for name in ("layers.0", "layers.1")}

    def cosine(module):
        with torch.no_grad():
            pairs = [(accuracy.mean_pooled(module(**b), b["attention_mask"]),
                      accuracy.mean_pooled(model(**b), b["attention_mask"])) for b in task.batches]
        return accuracy.mean_cosine(torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs]))

    one_shot = cosine(masked_copy(model, weights))
    refined, _ = accuracy.distill(task, model, weights, steps=60, lr=3e-3, batch=4, target="embedding")
    assert one_shot < 0.99 and cosine(refined) > one_shot + 0.5 * (1 - one_shot)


class _CharacterTokenizer:
    """Character codes as token ids, framed by 1 (start) and 2 (end), as BERT's tokenizer frames a text."""

    cls_token_id, sep_token_id = 1, 2

    def __call__(self, text: str, return_tensors: str, verbose: bool = True):
        ids = torch.tensor([[1, *map(ord, text), 2]])
        return type("Encoding", (), {"input_ids": ids})()


def test_random_windows_are_framed_spans_of_the_text_with_drawn_lengths():
    text = "".join(chr(65 + i % 26) + chr(97 + i // 26 % 26) for i in range(400))
    batches = accuracy.random_windows(_CharacterTokenizer(), text, count=12, size=3, lengths=[5, 9, 17],
                                      device=torch.device("cpu"))
    assert len(batches) == 12
    assert len({b["input_ids"].shape[1] for b in batches}) > 1  # lengths vary between batches
    for batch in batches:
        ids = batch["input_ids"]
        assert ids.shape[0] == 3 and ids.shape[1] in (5, 9, 17)
        assert (ids[:, 0] == 1).all() and (ids[:, -1] == 2).all()
        assert batch["attention_mask"].eq(1).all() and batch["token_type_ids"].eq(0).all()
        for window in ids[:, 1:-1]:
            assert "".join(map(chr, window.tolist())) in text
    again = accuracy.random_windows(_CharacterTokenizer(), text, 12, 3, [5, 9, 17], torch.device("cpu"))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))  # seeded
    with pytest.raises(ValueError, match="window lengths"):
        accuracy.random_windows(_CharacterTokenizer(), "short", 1, 1, [64], torch.device("cpu"))
