"""vnm_compile.explain: the per-layer report, stage diffs with provenance, HTML, logging, the CLI."""

import collections
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config
from torch import nn

import vnm_compile as vnm
from vnm_compile.cli import main

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CONFIG = vnm.VNMConfig(v=16, m=8, min_features=32, inductor=False)


def _llama():
    torch.manual_seed(0)
    config = tiny_config("llama")
    inputs = {"input_ids": torch.randint(0, 128, (2, 9)), "use_cache": False}
    return transformers.LlamaForCausalLM(config).eval(), inputs


def _vit():
    torch.manual_seed(0)
    config = tiny_config("vit")
    return transformers.ViTModel(config).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.fixture(scope="module", params=["llama", "vit"])
def explained(request):
    model, inputs = {"llama": _llama, "vit": _vit}[request.param]()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = vnm.explain(model, inputs, CONFIG)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
    return request.param, model, inputs, report


def test_every_linear_listed_once(explained):
    kind, model, _, report = explained
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    assert collections.Counter(layer.name for layer in report.layers) == collections.Counter(linears)
    table = str(report)
    assert all(table.count(f"\n{name} ") == 1 for name in linears)
    assert len(report.sparse_layers) >= len(linears) - 4  # only the small k/v projections of the Llama stay dense
    for layer in report.sparse_layers:
        assert layer.pattern == "16:2:8" and layer.sparsity == 0.75
        assert layer.weight.nbytes < layer.dense_bytes == layer.shape[0] * layer.shape[1] * 4
        assert layer.predicted_speedup == vnm.analytic_speedup(16, 8)
        assert layer.kernel == "reference (CPU)"
        assert 0 < layer.measured_error < 1.5


def test_measured_errors_match_hooks_and_the_sparsified_model(explained):
    """Each layer's measured error against one computed from the dense module's own input; the
    output error against the eager sparsified model."""
    kind, model, inputs, report = explained
    seen = {}
    hooks = [model.get_submodule(layer.name).register_forward_hook(
        lambda module, args, out, name=layer.name: seen.__setitem__(name, (args[0], out)))
        for layer in report.sparse_layers]
    with torch.no_grad():
        dense = model(**inputs)[0]
    for hook in hooks:
        hook.remove()
    for layer in report.sparse_layers:
        x, y = seen[layer.name]
        bias = model.get_submodule(layer.name).bias
        sparse = torch.nn.functional.linear(x.double(), layer.masked_weight().double(),
                                            None if bias is None else bias.detach().double())
        expected = float((sparse - y.double()).norm() / y.double().norm())
        assert layer.measured_error == pytest.approx(expected, rel=1e-3)
    with torch.no_grad():
        sparse_out = vnm.sparsify(model, inputs, CONFIG)(**inputs)[0]
    expected = float((sparse_out - dense).norm() / dense.norm())
    assert report.output_error == pytest.approx(expected, rel=0.05)  # the whole output, not only its first tensor


def test_stage_diffs_show_each_replaced_node(explained):
    _, _, _, report = explained
    stages = {stage.stage: stage for stage in report.stages}
    assert list(stages) == ["discover", "score", "permute", "fold", "sparsify"]
    assert not any(stages[name].changed for name in ("discover", "score", "permute"))
    sparsify = stages["sparsify"]
    diff = sparsify.unified()
    replacements = {origin: node for node, origin in sparsify.provenance.items() if not origin.startswith("new")}
    for layer in report.sparse_layers:
        assert f"\n-    {layer.node} = torch._C._nn.linear(" in diff
        new = replacements[layer.node]
        assert f"# replaces {layer.node}\n" in diff + "\n"
        share = re.search(rf"\n\+    {new} = (\w+)\[\d+\]", diff)  # fused with its neighbours: its part of the split
        op = re.search(rf"\n\+    {share.group(1)} = torch.functional.split\((\w+),", diff).group(1) if share else new
        line = next(line for line in diff.splitlines() if line.startswith(f"+    {op} = torch.ops.vnm.linear.default("))
        reads = [node for node, origin in sparsify.provenance.items()
                 if origin.startswith("new") and f" {node}," in line
                 and not node.endswith("_fused_bias")]  # fused biases are concatenated into a new buffer too
        assert len(reads) == 3  # values, columns, metadata
    fold = stages["fold"]
    assert fold.changed and all(origin.startswith("l_") for origin in fold.provenance.values())


def test_html_is_self_contained_and_lists_everything(explained, tmp_path):
    kind, _, _, report = explained
    path = report.html(tmp_path / f"{kind}.html")
    text = open(path, encoding="utf-8").read()
    assert "http" not in text and " src=" not in text
    assert text.count("<svg") == 1 and "<circle" in text
    assert all(layer.name in text for layer in report.layers)
    assert "torch.ops.vnm.linear.default" in text and "diff_add" in text


def test_html_renders_in_headless_chromium(explained, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed")
    kind, _, _, report = explained
    page, screenshot = tmp_path / "report.html", tmp_path / "report.png"
    report.html(page)
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}",
                    "--window-size=1600,1200", page.as_uri()], check=True, capture_output=True, timeout=120)
    image = pytest.importorskip("PIL.Image").open(screenshot).convert("L")
    darkest, lightest = image.getextrema()
    assert image.size == (1600, 1200) and darkest < 80 and lightest > 200  # text on a light page, not blank


def test_backend_option_writes_the_report(tmp_path):
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(3, 5, 64)
    path = tmp_path / "mlp.html"
    compiled = torch.compile(model, backend="vnm", options={"v": 16, "m": 8, "min_features": 16, "inductor": False,
                                                            "explain": str(path)})
    with torch.no_grad():
        out, dense = compiled(x), model(x)
    text = path.read_text(encoding="utf-8")
    assert "up" in text and "down" in text and "http" not in text
    report = vnm.reports()[-1]
    assert [layer.name for layer in report.sparse_layers] == ["up", "down"]
    assert report.output_error == pytest.approx(float((out - dense).norm() / dense.norm()), rel=1e-3)
    with pytest.raises(Exception, match="explain must be the path"):
        torch.compile(MLP(), backend="vnm", options={"explain": 3})(x)


@pytest.mark.parametrize("route", ["explain", "backend"])
def test_lower_stage_shows_what_inductor_lowers(route, tmp_path):
    """With Inductor on, the last stage is the aten graph Inductor lowers: each vnm.linear of the
    sparsify stage appears there as the op it runs on this device, annotated with where it came from."""
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(3, 64)
    options = {"v": 16, "m": 8, "min_features": 16}
    if route == "explain":
        report = vnm.explain(model, x, vnm.VNMConfig(**options))
    else:
        path = tmp_path / "mlp.html"
        with torch.no_grad():
            torch.compile(model, backend="vnm", options={**options, "explain": str(path)})(x)
        report = vnm.reports()[-1]
        assert "after lower" in path.read_text(encoding="utf-8")
    stages = {stage.stage: stage for stage in report.stages}
    assert list(stages) == ["discover", "score", "permute", "fold", "sparsify", "layout", "lower"]
    sparse_nodes = [node for node, origin in stages["sparsify"].provenance.items() if not origin.startswith("new")]
    lower = stages["lower"]
    assert len(sparse_nodes) == 2 and lower.changed
    lowered = [node for node, origin in lower.provenance.items() if origin in sparse_nodes]
    assert sorted(lower.provenance[node] for node in lowered) == sorted(sparse_nodes)
    for node in lowered:
        assert f"{node} = torch.ops.vnm.linear_dispatched.default(" in lower.after
        assert f"# lowered from {lower.provenance[node]}\n" in lower.after
    assert "torch.ops.aten." in lower.after and "torch.ops.vnm.linear.default" not in lower.after


def test_stage_logger_prints_diffs(caplog):
    with caplog.at_level(logging.INFO, logger="vnm_compile.stages"):
        vnm.explain(MLP(), torch.randn(2, 64), vnm.VNMConfig(v=16, m=8, min_features=16, inductor=False))
    text = caplog.text
    assert "vnm stage discover:\n(graph unchanged)" in text
    assert "vnm stage sparsify:" in text and "+" in text and "torch.ops.vnm.linear.default" in text


def test_torch_logs_and_torch_trace(tmp_path):
    """TORCH_LOGS=vnm_compile prints the stage diffs during torch.compile; TORCH_TRACE gets the graphs."""
    script = textwrap.dedent("""
        import torch, vnm_compile
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        compiled = torch.compile(model, backend="vnm", options={"v": 16, "m": 8, "min_features": 16})
        with torch.no_grad():
            compiled(torch.randn(4, 64))
    """)
    environment = {**os.environ, "TORCH_LOGS": "vnm_compile", "TORCH_TRACE": str(tmp_path / "trace")}
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "vnm stage sparsify:" in done.stderr and "torch.ops.vnm.linear.default" in done.stderr
    assert "vnm stage lower:" in done.stderr and "# lowered from" in done.stderr
    trace = "".join(path.read_text() for path in (tmp_path / "trace").iterdir())
    assert '"name": "vnm_after_sparsify"' in trace and '"name": "vnm_diff_fold"' in trace
    assert '"name": "vnm_after_lower"' in trace


def test_cli_writes_the_report_for_a_factory(tmp_path, capsys):
    factory = tmp_path / "factory.py"
    factory.write_text(textwrap.dedent("""
        import torch
        def make():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
            return model, (torch.randn(3, 64),)
        def wrong():
            return 3
    """))
    out = tmp_path / "out.html"
    main(["explain", f"{factory}:make", "--out", str(out), "--v", "16", "--m", "8", "--min-features", "16"])
    printed = capsys.readouterr().out
    assert "2 of 2 linears sparse" in printed and out.exists() and "<svg" in out.read_text()
    with pytest.raises(SystemExit, match="must return \\(model, example_inputs\\)"):
        main(["explain", f"{factory}:wrong"])
    with pytest.raises(SystemExit, match="has no callable 'missing'"):
        main(["explain", f"{factory}:missing"])
    with pytest.raises(SystemExit, match="expected <python-file-or-module>:<factory>"):
        main(["explain", "factory"])


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="^model must be an nn.Module"):
        vnm.explain("model", torch.randn(2, 64), CONFIG)
    with pytest.raises(ValueError, match="^example_inputs must be"):
        vnm.explain(MLP(), 3, CONFIG)
    with pytest.raises(ValueError, match="^config must be a VNMConfig"):
        vnm.explain(MLP(), torch.randn(2, 64), {"v": 16})
    report = vnm.explain(MLP(), torch.randn(2, 64), vnm.VNMConfig(v=16, m=8, min_features=16, inductor=False))
    with pytest.raises(ValueError, match="^path must be a file path"):
        report.html(3)


def test_cli_explain_runs_a_factory_file_whose_forward_reads_module_names(tmp_path):
    """As a user runs it: `vnm explain models.py:make` in a subprocess, for a model whose forward reads a
    module-level name (Dynamo looks the function's module up by name); the report has the layout and
    lower stages like the Python API's."""
    (tmp_path / "models.py").write_text(textwrap.dedent("""
        import torch
        SCALE = 0.5

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.up = torch.nn.Linear(64, 128)
                self.down = torch.nn.Linear(128, 64)

            def forward(self, x):
                return self.down(torch.nn.functional.gelu(self.up(x)) * SCALE)

        def make():
            torch.manual_seed(0)
            return Net().eval(), (torch.randn(3, 64),)
    """))
    command = [sys.executable, "-m", "vnm_compile.cli", "explain", "models.py:make", "--out", "r.html", "--v", "16",
               "--m", "8", "--min-features", "16", "--allow-small-v"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "2 of 2 linears sparse" in done.stdout
    page = (tmp_path / "r.html").read_text()
    assert "lower" in page and "layout" in page
    module_form = subprocess.run([*command[:4], "models:make", *command[5:]], cwd=tmp_path, capture_output=True,
                                 text=True, timeout=600)
    assert module_form.returncode == 0, module_form.stderr


def test_cli_help_answers_without_loading_torch():
    done = subprocess.run([sys.executable, "-c", "import sys; from vnm_compile.cli import main\n"
                           "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                           "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().endswith("False"), done.stdout + done.stderr


def test_a_graph_with_nothing_sparsified_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="vnm_compile"):
        vnm.explain(torch.nn.Sequential(torch.nn.Linear(8, 8)), torch.randn(2, 8), CONFIG)
    assert any("none of the 1 linears of this graph is sparsified (8x8 is smaller" in m for m in caplog.messages)
