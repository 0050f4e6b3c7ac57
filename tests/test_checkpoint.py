"""Compressed checkpoints: `save_compressed` / `load_compressed` and transformers' `save_pretrained` /
`from_pretrained`, on random-init tiny Llama, GPT-2 (Conv1D, tied embeddings), BERT and ViT."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config
from torch import nn

import vnm_compile as vnm
import vnm_compile.api  # noqa: F401  (patched below)
import vnm_compile.backend  # noqa: F401
from vnm_compile import checkpoint
from vnm_compile.pipeline import STAGES

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

OPTIONS = {"v": 16, "m": 8, "min_features": 48, "skip": ["lm_head"]}
TOKENS = {"input_ids": lambda: torch.randint(0, 128, (2, 9))}


def _configs():
    return {
        "llama": (transformers.LlamaForCausalLM, transformers.AutoModelForCausalLM,
                  tiny_config("llama"),
                  lambda: {"input_ids": torch.randint(0, 128, (2, 9)), "use_cache": False}),
        "gpt2": (transformers.GPT2LMHeadModel, transformers.AutoModelForCausalLM,
                 tiny_config("gpt2"),
                 lambda: {"input_ids": torch.randint(0, 128, (2, 9)), "use_cache": False}),
        "bert": (transformers.BertModel, transformers.AutoModel,
                 tiny_config("bert"),
                 lambda: {"input_ids": torch.randint(0, 128, (2, 9))}),
        "vit": (transformers.ViTModel, transformers.AutoModel,
                tiny_config("vit"),
                lambda: {"pixel_values": torch.randn(2, 3, 32, 32)}),
    }


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output.to_tuple()[0]


def _run(model, inputs):
    with torch.no_grad():
        return _first(model(**inputs))


def _sparse(name, options=OPTIONS, **config_changes):
    torch.manual_seed(0)
    cls, auto, config, make_inputs = _configs()[name]
    config = type(config)(**{**config.to_dict(), **config_changes})
    model = cls(config).eval()
    inputs = make_inputs()
    sparse = vnm.sparsify(model, inputs, vnm.VNMConfig(**options))
    return SimpleNamespace(name=name, cls=cls, auto=auto, config=config, model=sparse, inputs=inputs,
                           expected=_run(sparse, inputs), fresh_inputs=make_inputs())


@pytest.fixture(scope="module", params=["llama", "gpt2", "bert", "vit"])
def sparse(request):
    return _sparse(request.param)


@pytest.fixture(scope="module")
def saved(sparse, tmp_path_factory):
    """The sparse model through both formats: a compressed file and a save_pretrained directory."""
    directory = tmp_path_factory.mktemp(sparse.name)
    sparse.model.save_pretrained(directory / "pretrained")
    vnm.save_compressed(sparse.model, directory / "model.safetensors")
    return SimpleNamespace(file=directory / "model.safetensors", pretrained=directory / "pretrained")


def _load_file(sparse, path):
    return vnm.load_compressed(lambda: sparse.cls(sparse.config), path)


def _sparse_names(model):
    return {name for name, module in model.named_modules() if isinstance(module, vnm.VNMLinear)}


def _assert_same_model(loaded, sparse):
    assert _sparse_names(loaded) == _sparse_names(sparse.model) != set()
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert not loaded.training
    for inputs in (sparse.inputs, sparse.fresh_inputs):  # bit-exact, also on inputs it was not sparsified on
        assert torch.equal(_run(loaded, inputs), _run(sparse.model, inputs))


def test_file_round_trip(sparse, saved):
    _assert_same_model(_load_file(sparse, saved.file), sparse)


def test_pretrained_round_trip(sparse, saved):
    quantization = json.loads((saved.pretrained / "config.json").read_text())["quantization_config"]
    assert quantization["quant_method"] == "vnm" and set(quantization["layers"]) == _sparse_names(sparse.model)
    loaded = sparse.auto.from_pretrained(saved.pretrained)
    _assert_same_model(loaded, sparse)
    assert loaded.is_quantized and type(loaded.hf_quantizer).__name__ == "VNMHfQuantizer"


def test_loaded_model_saves_again(sparse, saved, tmp_path):
    loaded = sparse.auto.from_pretrained(saved.pretrained)
    loaded.save_pretrained(tmp_path)
    vnm.save_compressed(loaded, tmp_path / "again.safetensors")
    _assert_same_model(sparse.auto.from_pretrained(tmp_path), sparse)
    _assert_same_model(_load_file(sparse, tmp_path / "again.safetensors"), sparse)


def test_tied_embedding_stays_tied(tmp_path):
    gpt2 = _sparse("gpt2")  # lm_head skipped: still the embedding's weight
    assert gpt2.model.lm_head.weight is gpt2.model.transformer.wte.weight
    gpt2.model.save_pretrained(tmp_path)
    vnm.save_compressed(gpt2.model, tmp_path / "model.vnm")
    for loaded in (gpt2.auto.from_pretrained(tmp_path), _load_file(gpt2, tmp_path / "model.vnm")):
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        loaded.tie_weights()
        assert torch.equal(_run(loaded, gpt2.inputs), gpt2.expected)


def test_sparse_tied_head_unties(tmp_path):
    gpt2 = _sparse("gpt2", {**OPTIONS, "skip": []})  # lm_head compressed, the embedding dense: no longer tied
    assert isinstance(gpt2.model.lm_head, vnm.VNMLinear)
    assert not gpt2.model.config.tie_word_embeddings
    gpt2.model.tie_weights()  # used to raise KeyError: "attribute 'weight' already exists"
    gpt2.model.save_pretrained(tmp_path)
    vnm.save_compressed(gpt2.model, tmp_path / "model.vnm")
    for loaded in (gpt2.auto.from_pretrained(tmp_path), _load_file(gpt2, tmp_path / "model.vnm")):
        loaded.tie_weights()
        assert isinstance(loaded.lm_head, vnm.VNMLinear)
        assert torch.equal(_run(loaded, gpt2.inputs), gpt2.expected)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    llama = _sparse("llama")
    llama.dir = tmp_path_factory.mktemp("llama")
    llama.model.save_pretrained(llama.dir)
    llama.file = llama.dir / "model.vnm"
    vnm.save_compressed(llama.model, llama.file)
    return llama


def _rewrite_header(source, target, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}
        metadata = file.metadata()
    header = json.loads(metadata[checkpoint.HEADER_KEY])
    change(header)
    save_file(tensors, str(target), metadata={**metadata, checkpoint.HEADER_KEY: json.dumps(header)})


def test_other_format_version_fails_clearly(llama, tmp_path):
    _rewrite_header(llama.file, tmp_path / "v2.vnm", lambda header: header.update(format_version=2))
    with pytest.raises(ValueError, match="format version 2; this vnm-compile reads version 1"):
        _load_file(llama, tmp_path / "v2.vnm")
    config = json.loads((llama.dir / "config.json").read_text())
    config["quantization_config"]["format_version"] = 2
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    (pretrained / "config.json").write_text(json.dumps(config))
    (pretrained / "model.safetensors").symlink_to(llama.dir / "model.safetensors")
    with pytest.raises(ValueError, match="format version 2"):
        llama.auto.from_pretrained(pretrained)


def test_truncated_checkpoint_fails_clearly(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(llama.dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.columns"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((llama.dir / "config.json").read_text())
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.mlp\.up_proj: the checkpoint lacks its columns"):
        llama.auto.from_pretrained(tmp_path)
    tensors = load_file(llama.file)
    del tensors["model.layers.1.mlp.up_proj.columns"]
    save_file(tensors, tmp_path / "model.vnm", metadata=_metadata(llama.file))
    with pytest.raises(ValueError, match=r"lacks layer model\.layers\.1\.mlp\.up_proj's columns"):
        _load_file(llama, tmp_path / "model.vnm")


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return file.metadata()


def test_not_a_compressed_file_fails_clearly(llama, tmp_path):
    with pytest.raises(ValueError, match="not a vnm-compile checkpoint"):
        _load_file(llama, llama.dir / "model.safetensors")  # save_pretrained's: a plain state dict


def test_mismatched_model_names_the_layer(llama):
    other = transformers.LlamaConfig(**{**llama.config.to_dict(), "intermediate_size": 192})
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.mlp\.gate_proj: the checkpoint's is 128x64"):
        vnm.load_compressed(lambda: llama.cls(other), llama.file)
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.mlp\.\w+_proj: the checkpoint's is"):
        llama.auto.from_pretrained(llama.dir, intermediate_size=192)
    shallow = transformers.LlamaConfig(**{**llama.config.to_dict(), "num_hidden_layers": 1})
    with pytest.raises(ValueError, match=r"sparse layer model\.layers\.1\.\S+, which the model does not have"):
        vnm.load_compressed(lambda: llama.cls(shallow), llama.file)
    with pytest.raises(ValueError, match=r"a sparse linear there, the model a LlamaMLP"):
        vnm.load_compressed(lambda: _renamed(llama), llama.file)
    wide = llama.cls(transformers.LlamaConfig(**{**llama.config.to_dict(), "vocab_size": 256}))
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight has shape \(128, 64\) in .*, \(256, 64\)"):
        vnm.load_compressed(wide, llama.file)
    assert not _sparse_names(wide)  # a file that does not fit leaves the model as it was


def _renamed(llama):
    model = llama.cls(llama.config)
    model.model.layers[0].mlp.gate_proj = model.model.layers[0].mlp  # a module where a linear should be
    return model


def test_dense_state_dict_into_sparse_model_is_refused(llama):
    dense = llama.cls(llama.config).state_dict()
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj: the state dict has a dense"):
        llama.model.load_state_dict(dense, strict=False)


def test_from_pretrained_dtype_casts_sparse_layers(llama):
    loaded = llama.auto.from_pretrained(llama.dir, dtype=torch.bfloat16)
    assert {module.values.dtype for module in loaded.modules() if isinstance(module, vnm.VNMLinear)} == {torch.bfloat16}
    assert _run(loaded, llama.inputs).dtype == torch.bfloat16


def test_loading_runs_no_pass(llama, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading a compressed checkpoint must not run the passes")

    for target in ("vnm_compile.api.sparsify", "vnm_compile.api.run_passes", "vnm_compile.backend.run_passes",
                   "vnm_compile.pipeline.run_passes", "vnm_compile.format._choose",
                   "vnm_compile.format.VNMWeight.from_dense"):
        monkeypatch.setattr(target, refuse)
    monkeypatch.setattr("vnm_compile.pipeline.STAGES", tuple((name, refuse, graph) for name, _, graph in STAGES))
    assert torch.equal(_run(_load_file(llama, llama.file), llama.inputs), llama.expected)
    assert torch.equal(_run(llama.auto.from_pretrained(llama.dir), llama.inputs), llama.expected)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_vnm_backend_reuses_stored_weights(name, tmp_path, monkeypatch):
    """torch.compile(backend="vnm") of a loaded model runs its compressed weights as stored: no mask
    search, no permutation search, the output bit-equal to eager (as FX graph, no Inductor)."""
    sparse = _sparse(name)
    sparse.model.save_pretrained(tmp_path)
    loaded = sparse.auto.from_pretrained(tmp_path)
    eager = _run(loaded, sparse.fresh_inputs)

    def refuse(*args, **kwargs):
        raise AssertionError("the backend searched again")

    monkeypatch.setattr("vnm_compile.format._choose", refuse)
    monkeypatch.setattr(sys.modules["vnm_compile.passes.permute"], "linear_sum_assignment", refuse)
    compiled = torch.compile(loaded, backend="vnm", options={**OPTIONS, "inductor": False})
    assert torch.equal(_run(compiled, sparse.fresh_inputs), eager)
    layers = vnm.reports()[-1].layers
    assert all(layer.stored for layer in layers if layer.sparse)  # the stored layers, as they are
    assert all("stay dense" in layer.reason for layer in layers if not layer.sparse)  # nothing compressed anew
    torch._dynamo.reset()


def test_vnm_backend_fuses_stored_layers_and_keeps_their_layouts(tmp_path):
    """The backend takes the stored layers over as the sparse layers it makes itself: q/k/v and gate/up
    run fused, each with the prefill layout beside it; the output stays the loaded model's."""
    llama = _sparse("llama")
    llama.model.save_pretrained(tmp_path)
    loaded = llama.auto.from_pretrained(tmp_path)
    eager = _run(loaded, llama.fresh_inputs)
    torch._dynamo.reset()
    compiled = torch.compile(loaded, backend="vnm", options={**OPTIONS, "inductor": False, "prefill_layout": True})
    torch.testing.assert_close(_run(compiled, llama.fresh_inputs), eager, rtol=1e-5, atol=1e-5)
    report = vnm.reports()[-1]
    code = next(stage.after for stage in report.stages if stage.stage == "sparsify")
    calls = code.count("torch.ops.vnm.linear.default(")
    assert 0 < calls < len(report.sparse_layers)  # fused
    assert code.count("_expanded") >= calls  # each reads its prefill layout
    torch._dynamo.reset()


@pytest.mark.slow  # Inductor's C++ compile: ~15 s of CPU
def test_inductor_runs_loaded_model(tmp_path):
    llama = _sparse("llama", num_hidden_layers=1)  # one layer: Inductor's C++ compile is the test's time
    llama.model.save_pretrained(tmp_path)
    loaded = llama.auto.from_pretrained(tmp_path)
    eager = _run(loaded, llama.fresh_inputs)
    compiled = _run(torch.compile(loaded), llama.fresh_inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_loaded_model_runs_and_compiles_on_cuda(tmp_path):
    llama = _sparse("llama", num_hidden_layers=1)
    llama.model.half().save_pretrained(tmp_path)
    reference = _run(llama.auto.from_pretrained(tmp_path, dtype=torch.float32), llama.fresh_inputs)  # CPU
    loaded = llama.auto.from_pretrained(tmp_path, device_map="cuda")
    assert {t.device.type for t in loaded.buffers()} == {"cuda"}
    inputs = {key: value.cuda() if torch.is_tensor(value) else value for key, value in llama.fresh_inputs.items()}
    eager = _run(loaded, inputs)
    torch.testing.assert_close(eager.float().cpu(), reference, rtol=2e-2, atol=2e-2)
    for compiled in (torch.compile(loaded), torch.compile(loaded, backend="vnm", options=OPTIONS)):
        torch.testing.assert_close(_run(compiled, inputs), eager, rtol=2e-2, atol=2e-2)
        torch._dynamo.reset()


def _peak_cpu_bytes(fn):
    """What `fn` returns, and the peak of CPU tensor memory it allocated (the profiler's allocation events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        result = fn()
    events = sorted((e for e in profile.events() if e.name == "[memory]"), key=lambda e: e.time_range.start)
    peak = held = 0
    for event in events:
        held += event.cpu_memory_usage
        peak = max(peak, held)
    return result, peak


class _Stack(nn.Module):
    def __init__(self, dim=256, hidden=512, layers=3):
        super().__init__()
        self.embed = nn.Embedding(512, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                                  nn.Linear(hidden, dim, bias=False)) for _ in range(layers))

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return x


def test_load_memory_is_the_file(tmp_path):
    torch.manual_seed(0)
    model = _Stack().eval()
    for block in model.blocks:  # compressed directly: the checkpoint does not care how
        for index in (1, 3):
            linear = block[index]
            block[index] = vnm.VNMLinear(vnm.VNMWeight.from_dense(linear.weight.detach(), 16, 8, column_select="l1"),
                                           linear.bias)
    vnm.save_compressed(model, tmp_path / "model.vnm")
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    loaded, peak = _peak_cpu_bytes(lambda: vnm.load_compressed(_Stack, tmp_path / "model.vnm"))
    assert peak <= 1.05 * held
    assert sum(t.numel() * t.element_size() for t in [*loaded.parameters(), *loaded.buffers()]) == held
    dense_linears = 3 * 4 * 256 * 512 * 2
    assert held < 0.3 * dense_linears + 4 * (512 * 256 + 3 * (2 * 256 + 512))  # it is compressed
    ids = torch.randint(0, 512, (3, 17))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_import_is_lazy_and_registers_with_transformers():
    code = ("import sys, vnm_compile; assert 'transformers' not in sys.modules and 'safetensors' not in sys.modules; "
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING; assert 'vnm' in AUTO_QUANTIZER_MAPPING")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_sparsify_that_only_permutes_records_nothing():
    """sparsify=False folds the permutations and compresses nothing: the model stays a dense one."""
    llama = transformers.LlamaForCausalLM(tiny_config("llama")).eval()
    inputs = {"input_ids": torch.randint(0, 128, (2, 9))}
    permuted = vnm.sparsify(llama, inputs, vnm.VNMConfig(**{**OPTIONS, "sparsify": False}))
    assert not _sparse_names(permuted) and getattr(permuted.config, "quantization_config", None) is None
