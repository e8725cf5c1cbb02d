"""The sharpness report of a user's model from Python: entry point, checkpoint, batches.

The command line's messages for every mistake are tested in tests/test_cli.py."""
import json

import pytest
import torch

from pyflat.applications.usage import UsageError, usable_device
from pyflat.applications.user_model import (
    entry_sharpness,
    load_checkpoint,
    load_entry,
    prepare_data,
)

ENTRY = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    return model, (torch.randn(20, 5, generator=gen), torch.randint(0, 3, (20,), generator=gen))

def batches():
    model, (X, y) = build()
    return model, [(X[:8], y[:8]), (X[8:], y[8:])]
'''


@pytest.fixture
def entry(tmp_path):
    path = tmp_path / "user.py"
    path.write_text(ENTRY)
    return path


def test_entry_sharpness_returns_prints_and_writes_the_report(entry, tmp_path, capsys):
    out = tmp_path / "report.json"
    report = entry_sharpness(f"{entry}:build", curvature="ggn", k=2, out=out)
    assert report.curvature == "ggn" and report.num_samples == 20 and report.num_params == 57
    text = capsys.readouterr().out
    assert "GGN (cross-entropy only" in text and f"wrote {out}" in text
    assert json.loads(out.read_text())["num_params"] == 57
    # batches give the same report as the one batch they split
    same = entry_sharpness(f"{entry}:batches", curvature="ggn", k=2)
    assert same.top_eigenvalues == pytest.approx(report.top_eigenvalues, rel=1e-10)


def test_checkpoint_weights_are_the_ones_measured(entry, tmp_path, capsys):
    model, data = load_entry(f"{entry}:build")
    state = {name: 2 * value for name, value in model.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    load_checkpoint(model, tmp_path / "w.pt")
    assert torch.equal(model[0].weight, state["0.weight"])
    report = entry_sharpness(f"{entry}:build", checkpoint=tmp_path / "w.pt", k=1)
    assert report.param_norm == pytest.approx(
        float(torch.cat([v.flatten() for v in state.values()]).double().norm()))


def test_prepare_data_moves_batches_to_the_dtype(entry):
    _, (X, y) = load_entry(f"{entry}:build")
    data, first = prepare_data((X, y), "e", torch.device("cpu"), torch.float64)
    assert data is first and first[0].dtype == torch.float64 and torch.equal(first[1], y)
    data, first = prepare_data([(X[:4], y[:4]), (X[4:], y[4:])], "e", torch.device("cpu"),
                               torch.float64)
    assert [len(b[1]) for b in data] == [4, 16] and first[0].dtype == torch.float64
    tokens = torch.randint(0, 5, (3, 4))
    _, first = prepare_data((tokens, y[:3]), "e", torch.device("cpu"), torch.float64)
    assert first[0].dtype == torch.long  # token ids stay integers
    with pytest.raises(UsageError, match="--entry: the data of e has no batches"):
        prepare_data([], "e", torch.device("cpu"), torch.float64)


def test_usable_device():
    assert usable_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="--device must be cpu, cuda or cuda:<index>"):
        usable_device("gpu0")
