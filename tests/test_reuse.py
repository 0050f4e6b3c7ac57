"""The graphs the vnm backend compiles for one model (other input shapes, ...) take the first compile's
work: one permutation search, one compressed copy of each weight, the very same buffers."""

import gc
import importlib
import weakref

import pytest
import torch
from torch import nn

import vnm_compile as vnm
from vnm_compile import backend
from vnm_compile.passes.permute import _Search

# abs: the scores do not depend on the inputs, so a fresh compile of any input shape finds the
# solution the first compile found, and a reused graph must compute exactly what a fresh one does.
OPTIONS = {"v": 16, "m": 8, "criterion": "abs", "permute_rounds": 1}


class _GatedMLP(nn.Module):
    """gate/up read one input (a fused vnm.linear with a fused bias); their 128 outputs are one
    permutable channel space with down's inputs."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(64, 128)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def _model():
    torch.manual_seed(0)
    return _GatedMLP().eval()


def _run(model, x, **options):
    with torch.no_grad():
        return torch.compile(model, backend="vnm", options={**OPTIONS, **options}, dynamic=False)(x)


def _fresh(model, x, **options):
    """The output of a compile that finds no earlier work to take."""
    torch._dynamo.reset()
    backend._REUSE.clear()
    out = _run(model, x, **options)
    assert not _hits(vnm.reports()[-1])
    return out


def _hits(report) -> int:
    return sum(hits for hits, _ in report.reused.values())


@pytest.fixture(autouse=True)
def _reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def steps(monkeypatch):
    """How many permutation search steps ran."""
    count = []
    step = _Search.step
    monkeypatch.setattr(_Search, "step", lambda self, *args: count.append(1) or step(self, *args))
    return count


@pytest.fixture
def scored(monkeypatch):
    """How many weights' importance was computed."""
    score = importlib.import_module("vnm_compile.passes.score")  # the package's `score` is the pass function
    count = []
    importance = score.importance
    monkeypatch.setattr(score, "importance", lambda *args: count.append(1) or importance(*args))
    return count


@pytest.fixture
def lowered(monkeypatch):
    """The rewritten graphs the backend hands to Inductor, in compile order."""
    graphs = []
    lower = backend.lower
    monkeypatch.setattr(backend, "lower", lambda state, *args, **kwargs: graphs.append(state.graph)
                        or lower(state, *args, **kwargs))
    return graphs


def _sparse_buffers(gm) -> list[torch.Tensor]:
    return [gm.get_buffer(arg.target) for node in gm.graph.nodes if node.target is torch.ops.vnm.linear.default
            for arg in node.args if isinstance(arg, torch.fx.Node) and arg.op == "get_attr"]


def test_second_input_shape_takes_the_first_compile_work(steps, scored, lowered):
    model = _model()
    compiled = torch.compile(model, backend="vnm", options=OPTIONS, dynamic=False)
    xs = [torch.randn(2, 5, 64), torch.randn(17, 64)]
    with torch.no_grad():
        first_out = compiled(xs[0])
        searched, scores = len(steps), len(scored)
        second_out = compiled(xs[1])
    assert len(lowered) == 2 and searched > 0 and len(steps) == searched  # two graphs, one search
    assert scores > 0 and len(scored) == scores  # nor are the weights scored again (the report included)
    first, second = vnm.reports()[-2:]
    assert not _hits(first)
    assert second.reused["permutations"] == (1, 1) and second.reused["compressed"] == (3, 3)
    # the permuted dense weights were freed after the first compile: folded again, not compressed again
    assert second.reused["folded"] == (3, 6)
    assert all(hits == lookups for table, (hits, lookups) in second.reused.items() if table != "folded")
    assert "reused from an earlier compile" in str(second) and "reused" not in str(first)
    assert any(group.permuted for group in second.groups)
    # one copy of every weight: both graphs read the very same tensors
    sparse = [_sparse_buffers(gm) for gm in lowered]
    assert len(sparse[0]) == 8  # gate+up fused and down: values, columns, metadata, bias each
    assert [t.data_ptr() for t in sparse[0]] == [t.data_ptr() for t in sparse[1]]
    assert {t.data_ptr() for t in lowered[0].buffers()} == {t.data_ptr() for t in lowered[1].buffers()}
    for x, out in zip(xs, (first_out, second_out)):  # the fresh graphs run as FX graphs, not lowered
        torch.testing.assert_close(out, _fresh(model, x, inductor=False), rtol=1e-5, atol=1e-6)


def test_changed_parameter_is_compiled_afresh(steps):
    model = _model()
    x = torch.randn(4, 64)
    outputs = [_run(model, x, inductor=False)]
    held = []  # every compile's work stays registered through the resets
    for change in ("in place", "data"):
        held += backend._REUSE.values()
        searched = len(steps)
        new_weight = torch.randn_like(model.up.weight)
        with torch.no_grad():
            if change == "in place":
                model.up.weight.copy_(new_weight)
            else:  # .data moves the storage without bumping the version counter
                model.up.weight.data = new_weight
        torch._dynamo.reset()
        outputs.append(_run(model, x, inductor=False))
        assert not _hits(vnm.reports()[-1]) and len(steps) > searched, change
        assert not torch.allclose(outputs[-1], outputs[-2], rtol=1e-2, atol=1e-2), change
    assert len(set(held)) == 2
    torch.testing.assert_close(outputs[-1], _fresh(model, x, inductor=False), rtol=1e-6, atol=1e-6)


def test_only_the_same_solution_config_reuses(steps):
    model = _model()
    x = torch.randn(4, 64)
    _run(model, x, inductor=False)
    searched = len(steps)
    _run(model, x, inductor=False, m=16)
    assert vnm.reports()[-1].config.m == 16 and not _hits(vnm.reports()[-1])
    assert len(steps) > searched and len(backend._REUSE) == 2
    searched = len(steps)
    _run(model, x, inductor=False, verify=True)  # how a graph is checked or lowered is not its solution
    report = vnm.reports()[-1]
    assert report.verification is not None and report.reused["compressed"] == (3, 3)
    assert len(steps) == searched


def test_work_is_freed_with_the_compiled_graphs(monkeypatch):
    folded = []
    run_passes = backend.run_passes

    def keep(*args, **kwargs):
        state = run_passes(*args, **kwargs)
        folded.append({name: weakref.ref(tensor) for name, tensor in state.fold.tensors.items()})
        return state

    monkeypatch.setattr(backend, "run_passes", keep)
    model = _model()
    compiled = torch.compile(model, backend="vnm", options={**OPTIONS, "inductor": False}, dynamic=False)
    with torch.no_grad():
        compiled(torch.randn(3, 64))
        compiled(torch.randn(2, 3, 64))
    gc.collect()
    # No permuted dense copy of a compressed weight outlives its compile: the second graph folds
    # the weights again (and takes their compressed form); the biases its graphs read are kept.
    weights = [f"{linear}.weight" for linear in ("gate", "up", "down")]
    assert all(refs[name]() is None for refs in folded for name in weights)
    assert vnm.reports()[-1].reused["folded"] == (3, 6) and vnm.reports()[-1].reused["compressed"] == (3, 3)
    (reuse,) = backend._REUSE.values()
    reuse = weakref.ref(reuse)
    del compiled, model
    torch._dynamo.reset()  # Dynamo's cache holds the compiled graphs until then
    gc.collect()
    assert len(backend._REUSE) == 0 and reuse() is None
    assert folded and all(ref() is None for refs in folded for ref in refs.values())


@pytest.mark.parametrize("change", ["in place", "load_state_dict", "replaced"])
def test_changed_parameter_after_compile_raises_naming_it(change):
    """A compiled graph never serves the weights it compressed once the model's have changed."""
    model = _model()
    x = torch.randn(5, 64)
    compiled = torch.compile(model, backend="vnm", options={**OPTIONS, "inductor": False}, dynamic=False)
    with torch.no_grad():
        first = compiled(x)
        assert torch.equal(compiled(x), first)  # unchanged: it runs
        if change == "in place":
            model.down.bias.add_(1.0)
        elif change == "load_state_dict":
            model.load_state_dict({name: p + 1 for name, p in model.state_dict().items()})
        else:
            model.down.bias = torch.nn.Parameter(model.down.bias + 1)
        name = r"down\.bias" if change != "load_state_dict" else r"\S+"
        with pytest.raises(RuntimeError, match=rf"parameter {name} changed .*torch\.compiler\.reset\(\)"):
            compiled(x)
        torch.compiler.reset()
        again = torch.compile(model, backend="vnm", options={**OPTIONS, "inductor": False}, dynamic=False)(x)
    assert not torch.allclose(again, first)  # compiled afresh from the new weights
