"""The one trainer: full-batch Adam on CE + mu/2 |theta|^2."""
import pytest
import torch
from torch import nn

from pyflat.applications.digits import load_digits
from pyflat.applications.models import mlp
from pyflat.applications.training import accuracy, train


@pytest.fixture(scope="module")
def data():
    return load_digits(200, shuffle=True)


def model(seed=0):
    return mlp([64, 8, 10], nn.Tanh, seed=seed).double()


def loss_of(m, data):
    with torch.no_grad():
        return float(nn.functional.cross_entropy(m(data[0]), data[1]))


def test_loss_decreases_and_accuracy_rises(data):
    m = model()
    before, acc_before = loss_of(m, data), accuracy(m, data)
    trained = train(m, data, steps=100, lr=0.02)
    assert trained is m and not m.training  # trained in place, returned in eval mode
    assert loss_of(m, data) < 0.5 * before
    assert accuracy(m, data) > max(acc_before, 0.8)


def test_same_seed_same_weights_bit_for_bit(data):
    a = train(model(seed=1), data, steps=20, lr=0.02, weight_decay=0.01)
    b = train(model(seed=1), data, steps=20, lr=0.02, weight_decay=0.01)
    c = train(model(seed=2), data, steps=20, lr=0.02, weight_decay=0.01)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_the_l2_term_adds_mu_theta_to_the_gradient(data, monkeypatch):
    """The loss the trainer differentiates is CE + mu/2 |theta|^2: its gradient at the
    first step is the cross-entropy's plus mu theta."""
    mu = 0.3
    grads = {}
    step = torch.optim.Adam.step

    def record(self, *args, **kwargs):
        if not grads:
            grads.update({i: p.grad.clone() for i, p in enumerate(self.param_groups[0]["params"])})
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    m = model()
    theta = [p.detach().clone() for p in m.parameters()]
    ce = torch.autograd.grad(nn.functional.cross_entropy(m(data[0]), data[1]),
                             list(m.parameters()))
    train(m, data, steps=1, lr=0.01, weight_decay=mu)
    for i, (g, t) in enumerate(zip(ce, theta)):
        torch.testing.assert_close(grads[i] - g, mu * t, rtol=1e-12, atol=1e-14)


def test_the_same_operations_as_a_written_out_adam_loop(data):
    """The trainer's loop is the plain one, operation for operation: the demo's numbers
    come out the same bit for bit."""
    mu, steps, lr = 0.01, 15, 0.02
    ref = model()
    params = list(ref.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(ref(data[0]), data[1])
        loss = loss + 0.5 * mu * sum(p.pow(2).sum() for p in params)
        loss.backward()
        optimizer.step()
    ours = train(model(), data, steps=steps, lr=lr, weight_decay=mu)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))


def test_zero_steps_leave_the_model_as_it_came(data):
    m = model()
    before = [p.detach().clone() for p in m.parameters()]
    assert train(m, data, steps=0, lr=0.1) is m and not m.training
    assert all(torch.equal(p, q) for p, q in zip(before, m.parameters()))


@pytest.mark.parametrize("kwargs, error, message", [
    ({"steps": -1}, ValueError, "steps must be an integer >= 0, got -1"),
    ({"steps": 1.5}, TypeError, "steps must be an integer >= 0, got float 1.5"),
    ({"lr": 0.0}, ValueError, "lr must be a finite number > 0, got 0.0"),
    ({"lr": float("nan")}, ValueError, "lr must be a finite number > 0, got nan"),
    ({"lr": "0.1"}, TypeError, "lr must be a finite number > 0, got str '0.1'"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay must be a finite number >= 0, got -0.1"),
    ({"weight_decay": float("inf")}, ValueError, "weight_decay must be a finite number >= 0"),
])
def test_errors_name_the_argument(data, kwargs, error, message):
    args = {"steps": 1, "lr": 0.1, **kwargs}
    with pytest.raises(error, match=message):
        train(model(), data, **args)


def test_data_and_model_must_be_what_they_say(data):
    with pytest.raises(TypeError, match=r"data must be one batch \(X, y\) of tensors, got a "
                                        r"list of 1 \(tuple\)"):
        train(model(), [data], steps=1, lr=0.1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        train(lambda x: x, data, steps=1, lr=0.1)
