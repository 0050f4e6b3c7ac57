import os
import tempfile

# Inductor's on-disk caches key on graphs, not on the Python bodies of custom ops, so a cache left by
# an older checkout can replay stale guards: every test run compiles into a cache of its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="vnm-inductor-"))
# Spread over processes (pytest-xdist), each worker would start a pool of Inductor compile processes and
# a team of OpenMP threads as wide as the machine. Oversubscribed OpenMP threads spin against each other
# (four workers of two threads on two cores: a CPU mask selection 30x slower), so each worker compiles in
# its own process and gets its share of the cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The tiny random-init transformers models the tests share: dims that V = 16 and M = 8 divide.
TINY = {
    "llama": ("LlamaConfig", dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)),
    "gpt2": ("GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                eos_token_id=0)),
    "bert": ("BertConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64)),
    "vit": ("ViTConfig", dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=128)),
}


def tiny_config(kind: str, **changes):
    """The shared tiny config of a transformers model family ("llama", "gpt2", "bert", "vit")."""
    import transformers

    name, fields = TINY[kind]
    return getattr(transformers, name)(**{**fields, **changes})

