"""vnm.parallelize: V:N:M layers under PyTorch tensor parallelism, on 2 CPU processes over gloo.

One pair of processes (forked: no re-imports) runs every scenario and hands its results back through
files; the tests compare them with the unsharded models here.
"""

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import vnm_compile as vnm
from vnm_compile.modules import VNMLinear

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import Shard  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module  # noqa: E402

RANKS = 2
TOKENS = (1, 3, 17)
COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _megatron_plan() -> dict:
    """q/k/v and gate/up colwise, o and down rowwise: a dense Llama's usual plan, unchanged."""
    plan = {f"model.layers.*.self_attn.{name}": ColwiseParallel() for name in COLWISE[:3]}
    plan |= {f"model.layers.*.mlp.{name}": ColwiseParallel() for name in COLWISE[3:]}
    return plan | {"model.layers.*.self_attn.o_proj": RowwiseParallel(),
                   "model.layers.*.mlp.down_proj": RowwiseParallel()}


def _vnm_layer(rows: int, cols: int, v: int, m: int, bias: bool = True) -> VNMLinear:
    weight = vnm.VNMWeight.from_dense(torch.randn(rows, cols), v, m)
    return VNMLinear(weight, torch.randn(rows) if bias else None)


def _dense(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The float64 reference of a colwise-activation-rowwise stack of VNMLinear."""
    first, activation, second = model
    hidden = activation(x.double() @ first.weight.to_dense().double().T + first.bias.double())
    return hidden @ second.weight.to_dense().double().T + second.bias.double()


def _error(call) -> str:
    try:
        call()
    except Exception as error:  # the message is what the tests read
        return f"{type(error).__name__}: {error}"
    return "no error"


def _worker(rank: int, directory: str, cases: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=RANKS)
    mesh = init_device_mesh("cpu", (RANKS,))
    results = {}

    llama = vnm.parallelize(copy.deepcopy(cases["llama"]), mesh, _megatron_plan())
    with torch.no_grad():
        for ids in cases["ids"]:
            results[f"llama {ids.shape[1]}"] = llama(ids, use_cache=False).logits
        compiled = torch.compile(llama, backend="vnm", options={"inductor": False})
        results["llama compiled"] = compiled(cases["ids"][-1], use_cache=False).logits
    layers = dict(llama.named_modules())
    results["llama shapes"] = {name: (layer.out_features, layer.in_features, layer.values.shape)
                               for name, layer in layers.items() if isinstance(layer, VNMLinear)}

    mlp = vnm.parallelize(copy.deepcopy(cases["mlp"]), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    with torch.no_grad():
        results["mlp"] = [mlp(x) for x in cases["mlp inputs"]]
    # Sequence parallel: tokens sharded in and out, the output left a DTensor.
    plan = {"0": ColwiseParallel(input_layouts=Shard(1)),
            "2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)}
    sequence_parallel = vnm.parallelize(copy.deepcopy(cases["mlp"]), mesh, plan)
    x = cases["sequence parallel input"]
    with torch.no_grad():
        results["sequence parallel"] = sequence_parallel(x.chunk(RANKS, dim=1)[rank]).full_tensor()

    results["ragged rows"] = _error(lambda: vnm.parallelize(copy.deepcopy(cases["ragged"]), mesh,
                                                            {"0": ColwiseParallel()}))
    results["ragged groups"] = _error(lambda: vnm.parallelize(copy.deepcopy(cases["ragged"]), mesh,
                                                              {"2": RowwiseParallel()}))
    results["twice"] = _error(lambda: vnm.parallelize(mlp, mesh, {"0": ColwiseParallel()}))
    dense = parallelize_module(copy.deepcopy(cases["dense"]), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    with torch.no_grad():
        results["dense backend"] = _error(lambda: torch.compile(dense, backend="vnm", options={
            "v": 16, "m": 8, "allow_small_v": True})(torch.randn(3, 64)))
    torch.save(results, f"{directory}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    llama = transformers.LlamaForCausalLM(config).eval()
    ids = [torch.randint(0, 128, (1, tokens)) for tokens in TOKENS]
    sparse = vnm.sparsify(llama, {"input_ids": ids[-1], "use_cache": False},
                          vnm.VNMConfig(v=16, m=8, allow_small_v=True, min_features=16, skip=["lm_head"]))
    report = vnm.reports()[-1]
    # colwise 44 -> 96 (inputs ragged in m), rowwise 96 -> 24 in 16-groups: 3 per rank, an odd count
    mlp = nn.Sequential(_vnm_layer(96, 44, 16, 8), nn.GELU(), _vnm_layer(24, 96, 16, 16))
    cases = {"llama": sparse, "ids": ids, "mlp": mlp,
             "mlp inputs": [torch.randn(tokens, 44) for tokens in TOKENS] + [torch.randn(2, 3, 44)],
             "sequence parallel input": torch.randn(2, 6, 44),
             "ragged": nn.Sequential(_vnm_layer(48, 64, 16, 8), nn.ReLU(), _vnm_layer(64, 40, 16, 8)),
             "dense": nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))}
    with tempfile.TemporaryDirectory() as directory:
        mp.start_processes(_worker, args=(directory, cases), nprocs=RANKS, start_method="fork")
        results = [torch.load(Path(directory) / f"rank{rank}.pt", weights_only=False) for rank in range(RANKS)]
    return cases, report, results


def test_sharded_llama_equals_unsharded_sparse_model(run):
    cases, report, results = run
    assert {layer.name.rpartition(".")[2] for layer in report.sparse_layers} == {*COLWISE, "o_proj", "down_proj"}
    with torch.no_grad():
        for ids in cases["ids"]:
            expected = cases["llama"](ids, use_cache=False).logits
            for rank_results in results:
                torch.testing.assert_close(rank_results[f"llama {ids.shape[1]}"], expected, rtol=1e-5, atol=1e-5)


def test_the_permutation_is_searched_before_sharding(run):
    """The MLP hidden is permuted on the full weights, then sharded by position: still the same model."""
    cases, report, results = run
    permuted = [group for group in report.groups if group.permuted]
    assert any(name.endswith("mlp.down_proj") for group in permuted for name in group.readers)
    with torch.no_grad():
        expected = cases["llama"](cases["ids"][-1], use_cache=False).logits
    for rank_results in results:
        torch.testing.assert_close(rank_results["llama 17"], expected, rtol=1e-5, atol=1e-5)


def test_each_rank_holds_half_of_every_sharded_weight(run):
    cases, _, results = run
    full = {name: (layer.out_features, layer.in_features, layer.values.shape)
            for name, layer in cases["llama"].named_modules() if isinstance(layer, VNMLinear)}
    for rank_results in results:
        for name, (rows, cols, values) in rank_results["llama shapes"].items():
            full_rows, full_cols, full_values = full[name]
            if name.endswith(("o_proj", "down_proj")):
                assert (rows, cols, values[1]) == (full_rows, full_cols // RANKS, full_values[1] // RANKS)
            else:
                assert (rows, cols, values[1]) == (full_rows // RANKS, full_cols, full_values[1])


def test_sharded_layers_with_bias_and_ragged_shapes_match_float64(run):
    cases, _, results = run
    for rank_results in results:
        for x, y in zip(cases["mlp inputs"], rank_results["mlp"]):
            torch.testing.assert_close(y.double(), _dense(cases["mlp"], x), rtol=1e-5, atol=1e-4)


def test_sequence_parallel_layouts(run):
    cases, _, results = run
    expected = _dense(cases["mlp"], cases["sequence parallel input"])
    for rank_results in results:
        torch.testing.assert_close(rank_results["sequence parallel"].double(), expected, rtol=1e-5, atol=1e-4)


def test_shapes_that_do_not_divide_name_the_layer(run):
    _, _, results = run
    assert results[0]["ragged rows"].startswith("ValueError: layer 0: ColwiseParallel over 2 ranks")
    assert "multiple of v * 2 = 32" in results[0]["ragged rows"]
    assert results[0]["ragged groups"].startswith("ValueError: layer 2: RowwiseParallel over 2 ranks")
    assert "multiple of m * 2 = 16" in results[0]["ragged groups"]
    assert "layer 0 is sharded already" in results[0]["twice"]


def test_backend_on_tensor_parallel_models(run):
    """A sharded sparse model compiles (its stored layers are taken as they are); a sharded dense one
    is refused, naming a layer: masks and permutations need whole weights."""
    cases, _, results = run
    for rank_results in results:
        torch.testing.assert_close(rank_results["llama compiled"], rank_results["llama 17"], rtol=1e-5, atol=1e-5)
        message = rank_results["dense backend"]
        assert "layer 0: its parameter 0.weight is a DTensor" in message and "do not support" in message


@pytest.mark.parametrize("mode", ["eager", pytest.param("compiled", marks=pytest.mark.slow)])
def test_benchmark_smoke(tmp_path, mode):
    """benchmarks/tp.py as the GPU run launches it, on a tiny model over gloo (compiled: ~70 s here,
    Inductor compiling the blocks of both variants on a cold cache)."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(RANKS),
               "-m", "benchmarks.tp", "--smoke", "--modes", mode, "--out", str(tmp_path)]
    environment = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "tp-cpu.json").read_text())
    rows = {(row["variant"], row["shape"]): row for row in result["rows"]}
    assert set(rows) == {(variant, shape) for variant in ("dense", "vnm-64:2:8") for shape in ("1x64", "1x1", "4x1")}
    assert {row["mode"] for row in rows.values()} == {mode}
    for row in rows.values():
        assert row["max_abs_diff_vs_1gpu"] < 1e-5 * row["max_abs_logit"] + 1e-6
    # float32 at 16:2:8: values 1/4 of the dense bytes, metadata 1/64, columns 1/128
    assert rows["vnm-64:2:8", "1x1"]["layers_bytes_x_dense"] == pytest.approx(1 / 4 + 1 / 64 + 1 / 128, rel=1e-3)
    if mode == "compiled":  # the targets are read on the compiled decode step
        assert "memory: 0.273x (met)" in (tmp_path / "tp-cpu.md").read_text()
