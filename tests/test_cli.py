"""The command line: the demo end to end (small), the sharpness command, clear errors."""
import json
import re

import pytest
import torch

from pyflat import cli

ENTRY = '''
import torch
from torch import nn

def build():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    X = torch.randn(12, 1, 6, 6, generator=gen)
    y = torch.randint(0, 4, (12,), generator=gen)
    return model, (X, y)

def loader():
    model, (X, y) = build()
    return model, [(X[:5], y[:5]), (X[5:], y[5:])]

def generator():
    model, (X, y) = build()
    return model, ((X[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4))

def not_a_pair():
    return 3
'''


@pytest.fixture
def entry(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(ENTRY)
    return path


def test_demo_writes_tables_json_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    status = cli.main(["demo", "--out", str(out), "--weight-decays", "0", "0.01",
                       "--steps", "60", "--width", "8", "--train-size", "300",
                       "--trace-products", "30", "--frobenius-probes", "10",
                       "--slq-probes", "4", "--slq-steps", "30"])
    assert status == 0
    text = capsys.readouterr().out
    assert "logistic regression 64-10, 650 parameters" in text
    assert "MLP 64-8-10 (tanh)" in text and "CE+L2" in text
    result = json.loads((out / "demo.json").read_text())
    assert [(r["model"], r["weight_decay"]) for r in result["runs"]] == [
        ("logreg", 0.0), ("logreg", 0.01), ("mlp", 0.0), ("mlp", 0.01)]
    for run in result["runs"]:
        assert (out / run["density_png"]).stat().st_size > 0
        for curvature in ("ggn", "hessian"):
            ce = run["curvature"][curvature]["cross_entropy"]
            l2 = run["curvature"][curvature]["with_l2"]
            P = ce["num_params"]
            # the L2 view is the CE operator shifted by mu
            assert l2["trace"] == pytest.approx(ce["trace"] + run["weight_decay"] * P)
            assert ce["spectral_norm"] > 0 and 0 <= ce["rank"]["rank"] <= P
        assert 0.5 < run["test_accuracy"] <= 1.0


def test_sharpness_command_prints_and_writes_json(entry, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert cli.main(["sharpness", "--entry", f"{entry}:build", "--curvature", "ggn",
                     "--k", "2", "--out", str(out)]) == 0
    assert "GGN (cross-entropy only" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["curvature"] == "ggn" and report["num_samples"] == 12
    # a data set as an iterable of batches, a checkpoint, float32
    torch.manual_seed(1)
    state = {k: v * 2 for k, v in
             torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                 torch.nn.Linear(48, 4)).state_dict().items()}
    ckpt = tmp_path / "weights.pt"
    torch.save(state, ckpt)
    assert cli.main(["sharpness", "--entry", f"{entry}:loader", "--checkpoint", str(ckpt),
                     "--dtype", "float32", "--k", "1"]) == 0
    assert "HESSIAN" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--entry", "nowhere.py:build"], "--entry: no such file: nowhere.py"),
    (["--entry", "build"], "--entry must be 'module:function'"),
    (["--entry", "no_such_module_xyz:build"], "--entry: cannot import 'no_such_module_xyz'"),
    (["--entry", "{entry}:missing"], "has no function 'missing'"),
    (["--entry", "{entry}:not_a_pair"], "must return \\(model, data\\)"),
    (["--entry", "{entry}:build", "--checkpoint", "nope.pt"], "--checkpoint: no such file"),
    (["--entry", "{entry}:generator"], "can be read only once.*list of batches"),
])
def test_errors_are_one_line_and_exit_2(entry, args, message, capsys):
    args = [a.replace("{entry}", str(entry)) for a in args]
    assert cli.main(["sharpness", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert err.startswith("pyflat sharpness: error: ")


def test_checkpoint_that_does_not_fit(entry, tmp_path, capsys):
    ckpt = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), ckpt)
    assert cli.main(["sharpness", "--entry", f"{entry}:build", "--checkpoint", str(ckpt)]) == 2
    assert "does not fit the model" in capsys.readouterr().err


def test_help_for_every_subcommand(capsys):
    for command in ("demo", "sharpness", "bench"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        assert f"usage: pyflat {command}" in capsys.readouterr().out
    assert cli.main([]) == 2


def test_bench_sweep_writes_json_markdown_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[1])
    out = tmp_path / "sweep"
    assert cli.main(["bench", "--models", "mlp128", "cnn", "--batches", "32", "--ks", "1", "3",
                     "--seconds", "0.01", "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    cases = {(r["model"], r["k"], r["product"], r["method"]) for r in rows}
    assert ("cnn", 3, "hessian", "torch.func") in cases
    assert ("mlp128", 1, "hessian", "double backward") in cases
    assert all(r["rel_error"] < 1e-3 and r["products_per_s"] > 0 for r in rows)
    assert (out / "sweep.png").stat().st_size > 0
    assert "| cnn | 32 | 3 | ggn | pyflat |" in (out / "sweep.md").read_text()
