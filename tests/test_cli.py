"""The command line: its options reach the applications as given, the sharpness command
end to end, and every mistake ends in one clear line (exit status 2). The applications'
own results are tested under tests/applications."""
import json
import os
import re

import pytest
import torch

from pyflat import cli, paper
from pyflat.applications import usage

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

def raises():
    raise FileNotFoundError("no data at /datasets/digits")

def dict_batches():
    model, (X, y) = build()
    return model, [{"image": X[:6], "label": y[:6]}, {"image": X[6:], "label": y[6:]}]

def labels_as_list():
    model, (X, y) = build()
    return model, (X, y.tolist())

def no_batches():
    model, _ = build()
    return model, []

def wrong_input_size():
    model, (X, y) = build()
    return model, (X[:, :, :4], y)
'''


@pytest.fixture
def entry(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(ENTRY)
    return path


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


SHARPNESS_ERRORS = [
    (["--entry", "nowhere.py:build"], "--entry: no such file: nowhere.py"),
    (["--entry", "build"], "--entry must be 'module:function'"),
    (["--entry", "no_such_module_xyz:build"], "--entry: cannot import 'no_such_module_xyz'"),
    (["--entry", "{entry}:missing"], "has no function 'missing'"),
    (["--entry", "{entry}:not_a_pair"], "must return \\(model, data\\)"),
    (["--entry", "{entry}:build", "--checkpoint", "nope.pt"], "--checkpoint: no such file"),
    (["--entry", "{entry}:generator"], "can be read only once.*list of batches"),
    (["--entry", "{entry}:raises"], "--entry: .*my_model.py:raises raised FileNotFoundError: no "
                                    "data at /datasets/digits \\(pyflat --traceback"),
    (["--entry", "{entry}:dict_batches"], "each batch of the data of .*:dict_batches must be a "
                                          "pair \\(X, y\\) of tensors, got a dict \\(keys "
                                          "'image', 'label'\\)"),
    (["--entry", "{entry}:labels_as_list"], "must be a pair \\(X, y\\) of tensors, got a "
                                            "tuple of 2 \\(Tensor, list\\)"),
    (["--entry", "{entry}:no_batches"], "the data of .*:no_batches has no batches"),
    (["--entry", "{entry}:wrong_input_size"], "the model of .* fails on the first batch: "
                                              "RuntimeError: mat1 and mat2"),
    # what the arguments alone decide is refused before the entry's build() runs
    (["--entry", "{entry}:raises", "--device", "nonsense"],
     "--device must be cpu, cuda or cuda:<index>, got 'nonsense'$"),
    (["--entry", "{entry}:raises", "--device", "meta"],
     "--device meta holds shapes but no values, so there is nothing to measure: use cpu or "
     "cuda$"),
    (["--entry", "{entry}:raises", "--with-l2"],
     "--with-l2 measures CE \\+ mu/2 \\|theta\\|\\^2 and needs --weight-decay > 0, got 0$"),
    (["--entry", "{entry}:raises", "--k", "0"], "argument --k: must be an integer >= 1, got 0$"),
    (["--entry", "{entry}:raises", "--weight-decay", "-1"],
     "argument --weight-decay: must be a finite number >= 0, got -1$"),
    (["--entry", "{entry}:raises", "--weight-decay", "nan"],
     "argument --weight-decay: must be a finite number >= 0, got nan$"),
    (["--entry", "{entry}:raises", "--out", "{entry}/report.json"],
     "--out: cannot write .*my_model.py/report.json: .*my_model.py is a file, not a folder$"),
    (["--entry", "{entry}:raises", "--out", "{tmp}/no/such/folder/report.json"],
     "--out: cannot write .*/report.json: .*/no/such/folder does not exist$"),
    (["--entry", "{entry}:raises", "--out", "{tmp}"], "--out: .* is a folder; give a file name$"),
]


@pytest.mark.parametrize("args, message", SHARPNESS_ERRORS,
                         ids=[" ".join(a).replace("{entry}:", "") for a, _ in SHARPNESS_ERRORS])
def test_errors_are_one_line_and_exit_2(entry, tmp_path, args, message, capsys):
    args = [a.replace("{entry}", str(entry)).replace("{tmp}", str(tmp_path)) for a in args]
    assert cli.main(["sharpness", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert err.startswith("pyflat sharpness: error: ")
    assert captured.out == ""  # nothing measured, nothing printed


def test_traceback_shows_the_error_of_the_entry(entry):
    with pytest.raises(cli.UsageError, match="raised FileNotFoundError") as raised:
        cli.main(["--traceback", "sharpness", "--entry", f"{entry}:raises"])
    assert isinstance(raised.value.__cause__, FileNotFoundError)


def test_out_is_checked_before_the_work_and_left_as_it_was(entry, tmp_path, capsys):
    existing = tmp_path / "existing.json"
    existing.write_text("kept\n")
    assert cli.main(["sharpness", "--entry", f"{entry}:raises", "--out", str(existing)]) == 2
    assert existing.read_text() == "kept\n"
    fresh = tmp_path / "fresh.json"
    assert cli.main(["sharpness", "--entry", f"{entry}:raises", "--out", str(fresh)]) == 2
    assert not fresh.exists()
    assert "raised FileNotFoundError" in capsys.readouterr().err


def test_out_in_a_read_only_folder(entry, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            # root (CAP_DAC_OVERRIDE) writes in read-only folders: the writes are refused
            # the way the operating system refuses them to anyone else
            def refused(*args, **kwargs):
                raise PermissionError(13, "Permission denied")
            monkeypatch.setattr(usage, "open", refused, raising=False)
            monkeypatch.setattr(usage.tempfile, "TemporaryFile", refused)
        assert cli.main(["sharpness", "--entry", f"{entry}:raises", "--out",
                         str(folder / "report.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"pyflat sharpness: error: --out: cannot write {folder / 'report.json'}: " \
                      "Permission denied"
        assert cli.main(["demo", "--out", str(folder / "demo")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"pyflat demo: error: --out: cannot write in the folder "
                       f"{folder / 'demo'}: Permission denied")
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("kind, message", [
    ("whole model", "holds a pickled torch.nn.modules.container.Sequential, not a state_dict "
                    "\\(was it saved with torch.save\\(model\\)\\?\\); save "
                    "model.state_dict\\(\\) instead"),
    ("corrupt", "is not a file torch.save wrote \\(or it is damaged\\): torch.load cannot "
                "read it$"),
    ("truncated", "is not a file torch.save wrote \\(or it is damaged\\): torch.load says "),
    ("empty", "is empty$"),
], ids=["whole model", "corrupt", "truncated", "empty"])
def test_checkpoint_that_is_not_a_state_dict(entry, tmp_path, kind, message, capsys):
    ckpt = tmp_path / "weights.pt"
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(48, 4))
    if kind == "whole model":
        torch.save(model, ckpt)
    elif kind == "corrupt":
        ckpt.write_bytes(b"not a checkpoint " * 8)
    elif kind == "truncated":
        torch.save(model.state_dict(), ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    else:
        ckpt.write_bytes(b"")
    assert cli.main(["sharpness", "--entry", f"{entry}:build", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"pyflat sharpness: error: --checkpoint: {ckpt} "), err
    assert re.search(message, err), err


# the smallest demo: every refusal below must come before it trains anything
SMALL_DEMO = ["--steps", "1", "--train-size", "20", "--width", "2", "--weight-decays", "0",
              "--trace-products", "6", "--frobenius-probes", "2", "--slq-probes", "1",
              "--slq-steps", "2"]


DEMO_REFUSALS = [
    (["--train-size", "0"], "argument --train-size: must be an integer >= 1, got 0"),
    (["--train-size", "1797"], "--train-size must leave test images: at most 1796 of the "
                               "1,797 digits, got 1797"),
    (["--train-size", "5000"], "--train-size must leave test images: at most 1796 of the "
                               "1,797 digits, got 5000"),
    (["--width", "0"], "argument --width: must be an integer >= 1, got 0"),
    (["--width", "abc"], "argument --width: must be an integer >= 1, got 'abc'"),
    (["--steps", "-5"], "argument --steps: must be an integer >= 0, got -5"),
    (["--slq-steps", "0"], "argument --slq-steps: must be an integer >= 1, got 0"),
    (["--slq-probes", "0"], "argument --slq-probes: must be an integer >= 1, got 0"),
    (["--frobenius-probes", "1"], "argument --frobenius-probes: must be an integer >= 2 "
                                  "(a standard error needs 2), got 1"),
    (["--trace-products", "2"], "argument --trace-products: must be an integer >= 6 "
                                "(Hutch++ spends them in three equal parts of at least 2), "
                                "got 2"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
    (["--weight-decays", "0", "-1"], "argument --weight-decays: must be a finite number >= 0, "
                                     "got -1"),
    (["--weight-decays", "inf"], "argument --weight-decays: must be a finite number >= 0, "
                                 "got inf"),
]


@pytest.mark.parametrize("args, message", DEMO_REFUSALS,
                         ids=[" ".join(a) for a, _ in DEMO_REFUSALS])
def test_demo_refuses_nonsense_before_training(tmp_path, args, message, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), *SMALL_DEMO, *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"pyflat demo: error: {message}"
    assert captured.out == "" and not out.exists()


def test_demo_out_that_cannot_be_a_folder(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    assert cli.main(["demo", "--out", str(a_file / "demo"), *SMALL_DEMO]) == 2
    assert capsys.readouterr().err.strip() == (
        f"pyflat demo: error: --out: cannot write in the folder {a_file / 'demo'}: "
        "Not a directory")
    assert cli.main(["demo", "--out", str(a_file), *SMALL_DEMO]) == 2
    assert capsys.readouterr().err.strip() == (
        f"pyflat demo: error: --out: {a_file} is a file; give a folder for the results")


def test_argument_errors_are_one_line(capsys):
    assert cli.main(["sharpness"]) == 2
    assert capsys.readouterr().err.strip() == (
        "pyflat sharpness: error: the following arguments are required: --entry")
    assert cli.main(["demo", "--no-such-option"]) == 2
    assert capsys.readouterr().err.strip() == (
        "pyflat: error: unrecognized arguments: --no-such-option")


def test_paper_out_is_checked_before_the_experiments(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    assert paper.main(["--out", str(a_file / "paper.json")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"python -m pyflat.paper: error: --out: cannot write {a_file / 'paper.json'}: "
        f"{a_file} is a file, not a folder")


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


def test_demo_options_reach_the_demo(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "demo", lambda out, **kwargs: calls.append((out, kwargs)))
    assert cli.main(["demo"]) == 0
    assert calls.pop() == ("pyflat-demo", {
        "weight_decays": [0.0, 1e-3, 1e-2], "steps": 1000, "lr": 0.02, "width": 32,
        "train_size": 1200, "trace_products": 99, "frobenius_probes": 30, "slq_probes": 10,
        "slq_steps": 80})
    assert cli.main(["demo", "--out", "x", "--weight-decays", "0.5", "--steps", "3", "--lr",
                     "0.1", "--width", "4", "--train-size", "10", "--trace-products", "9",
                     "--frobenius-probes", "3", "--slq-probes", "2", "--slq-steps", "5"]) == 0
    assert calls.pop() == ("x", {
        "weight_decays": [0.5], "steps": 3, "lr": 0.1, "width": 4, "train_size": 10,
        "trace_products": 9, "frobenius_probes": 3, "slq_probes": 2, "slq_steps": 5})


def test_sharpness_options_reach_the_application(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "entry_sharpness",
                        lambda entry, **kwargs: calls.append((entry, kwargs)))
    assert cli.main(["sharpness", "--entry", "m:f"]) == 0
    assert calls.pop() == ("m:f", {"checkpoint": None, "curvature": "hessian",
                                   "weight_decay": 0.0, "with_l2": False, "k": 5, "seed": 0,
                                   "device": "cpu", "dtype": "float64", "out": None})
    assert cli.main(["sharpness", "--entry", "m.py:f", "--checkpoint", "w.pt", "--curvature",
                     "ggn", "--weight-decay", "0.1", "--with-l2", "--k", "2", "--seed", "3",
                     "--device", "cuda", "--dtype", "float32", "--out", "r.json"]) == 0
    assert calls.pop() == ("m.py:f", {"checkpoint": "w.pt", "curvature": "ggn",
                                      "weight_decay": 0.1, "with_l2": True, "k": 2, "seed": 3,
                                      "device": "cuda", "dtype": "float32", "out": "r.json"})


def test_bench_options_reach_the_sweep(monkeypatch):
    calls = []

    def sweep(out, **kwargs):
        calls.append((out, kwargs))
        return 1  # the sweep's exit status is the command's

    monkeypatch.setattr(cli, "sweep", sweep)
    assert cli.main(["bench"]) == 1
    assert calls.pop() == ("bench/results", {"models": None, "batches": None, "ks": None,
                                             "seconds": None, "device": "cpu", "quick": False})
    assert cli.main(["bench", "--quick", "--models", "cnn", "mlp512", "--batches", "8", "16",
                     "--ks", "2", "--seconds", "0.5", "--device", "cuda", "--out", "o"]) == 1
    assert calls.pop() == ("o", {"models": ["cnn", "mlp512"], "batches": [8, 16], "ks": [2],
                                 "seconds": 0.5, "device": "cuda", "quick": True})


BENCH_REFUSALS = [
    (["--models", "resnet"], r"argument --models: invalid choice: 'resnet' \(choose from "),
    (["--batches", "0"], "argument --batches: must be an integer >= 1, got 0$"),
    (["--ks", "1", "-2"], "argument --ks: must be an integer >= 1, got -2$"),
    (["--device", "nonsense"], "--device must be cpu, cuda or cuda:<index>, got 'nonsense'$"),
]


@pytest.mark.parametrize("args, message", BENCH_REFUSALS,
                         ids=[" ".join(a) for a, _ in BENCH_REFUSALS])
def test_bench_refuses_nonsense_in_one_line(tmp_path, args, message, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["bench", "--out", str(out), *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pyflat bench: error: "), err
    assert re.search(message, err), err
    assert captured.out == "" and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_bench_on_cuda_without_a_gpu(tmp_path, capsys):
    assert cli.main(["bench", "--device", "cuda", "--out", str(tmp_path / "sweep")]) == 2
    assert capsys.readouterr().err.strip() == (
        "pyflat bench: error: --device cuda: no CUDA GPU is visible to torch")


@pytest.mark.parametrize("extra, tuned", [([], True), (["--default-allocator"], False)])
def test_long_runs_tune_the_allocator_unless_asked_not_to(monkeypatch, extra, tuned):
    calls = []
    monkeypatch.setattr(cli, "tune_allocator", lambda: calls.append("tuned") or True)
    monkeypatch.setattr(cli, "demo", lambda out, **kwargs: 0)
    assert cli.main(["demo", *extra]) == 0
    assert calls == (["tuned"] if tuned else [])
