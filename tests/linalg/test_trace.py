"""Trace and Frobenius estimators: calibrated errors, Hutch++ against Hutchinson."""
import math

import pytest
import torch

import pyflat

from helpers import make_batch, make_mlp, symmetric


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_term_variance_matches_theory(distribution):
    gen = torch.Generator().manual_seed(0)
    A = symmetric(torch.randn(60, generator=gen, dtype=torch.float64), seed=1)
    est = pyflat.hutchinson_trace(A, 4000, distribution, seed=2)
    fro2 = float((A ** 2).sum())
    theory = 2 * (fro2 - float((torch.diagonal(A) ** 2).sum())) if distribution == "rademacher" \
        else 2 * fro2
    # the sample variance of 4000 terms is within ~10% of its expectation here
    assert abs(float(est.samples.var()) / theory - 1) < 0.12
    assert abs(est.value - float(torch.trace(A))) < 4 * est.stderr
    assert est.products == 4000


def test_estimates_are_blocked_and_reproducible():
    A = symmetric(torch.linspace(0, 2, 40, dtype=torch.float64), seed=3)
    calls = []

    class Counting:
        shape, dtype, device = A.shape, A.dtype, A.device

        def __matmul__(self, V):
            calls.append(V.shape)
            return A @ V

    a = pyflat.hutchinson_trace(Counting(), 30, seed=4, block_size=16)
    b = pyflat.hutchinson_trace(A, 30, seed=4)
    assert calls == [(40, 16), (40, 14)]
    assert a.value == pytest.approx(b.value, rel=1e-14)


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    A = symmetric(1.0 / torch.arange(1, 201, dtype=torch.float64) ** 2, seed=5)
    exact = float(torch.trace(A))
    hutch = [abs(pyflat.hutchinson_trace(A, 30, seed=s).value - exact) for s in range(20)]
    hpp = [abs(pyflat.hutchpp_trace(A, 30, seed=s).value - exact) for s in range(20)]
    assert sorted(hpp)[10] < 0.1 * sorted(hutch)[10]
    est = pyflat.hutchpp_trace(A, 30, seed=0)
    assert est.products == 30 and abs(est.value - exact) < 4 * est.stderr + 1e-12


def test_frobenius_norm_within_its_standard_error():
    gen = torch.Generator().manual_seed(6)
    A = symmetric(torch.randn(50, generator=gen, dtype=torch.float64), seed=7)
    est = pyflat.frobenius_norm(A, 400, seed=8)
    assert abs(est.value - float(torch.linalg.matrix_norm(A))) < 4 * est.stderr


def test_trace_of_a_real_ggn_against_dense():
    model = make_mlp([8, 16, 5], "tanh", seed=9)
    G = pyflat.GGN(model, make_batch(50, 8, 5))
    dense = G.to_dense()
    est = pyflat.hutchpp_trace(G, 60, seed=1)
    assert abs(est.value - float(torch.trace(dense))) < 4 * est.stderr
    fro = pyflat.frobenius_norm(G, 200, seed=2)
    assert abs(fro.value - float(torch.linalg.matrix_norm(dense))) < 4 * fro.stderr


def test_float32_operator_gives_float64_samples():
    model = make_mlp([6, 8, 3], "relu", dtype=torch.float32)
    H = pyflat.Hessian(model, make_batch(20, 6, 3, dtype=torch.float32))
    est = pyflat.hutchinson_trace(H, 10, seed=0)
    assert est.samples.dtype == torch.float64 and math.isfinite(est.value)


@pytest.mark.parametrize("call, message", [
    (lambda A: pyflat.hutchinson_trace(A, 1), "num_probes must be an int >= 2, got 1"),
    (lambda A: pyflat.hutchpp_trace(A, 5), "num_products must be an int >= 6, got 5"),
    (lambda A: pyflat.frobenius_norm(A, 10, "uniform"),
     "distribution must be 'rademacher' or 'gaussian', got 'uniform'"),
    (lambda A: pyflat.hutchinson_trace(A, 10, seed=1, generator=torch.Generator()),
     "give either seed or generator, not both"),
])
def test_estimator_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.eye(5, dtype=torch.float64))


def test_adaptive_trace_meets_its_target_and_beats_plain_hutchinson():
    A = symmetric(1.0 / torch.arange(1, 301, dtype=torch.float64), seed=11)
    exact = float(torch.trace(A))
    est = pyflat.adaptive_trace(A, 0.01, seed=0)
    assert est.converged and est.stderr <= 0.01 * abs(est.value)
    assert abs(est.value - exact) < 4 * est.stderr
    plain = pyflat.hutchinson_trace(A, est.products, seed=0)
    assert plain.stderr > est.stderr  # same products, larger error without the sketch


def test_adaptive_trace_reports_a_budget_that_ran_out():
    gen = torch.Generator().manual_seed(12)
    A = symmetric(torch.randn(100, generator=gen, dtype=torch.float64), seed=13)
    est = pyflat.adaptive_trace(A, 1e-4, max_products=80, seed=0)
    assert est.converged is False and est.products <= 80
    with pytest.raises(ValueError, match=r"rel_stderr must be in \(0, 1\), got 0"):
        pyflat.adaptive_trace(A, 0)


def test_adaptive_trace_keeps_the_sketch_within_max_products():
    A = symmetric(torch.linspace(-1, 2, 50, dtype=torch.float64), seed=3)
    calls = []

    class Counting:
        shape, dtype, device = A.shape, A.dtype, A.device

        def __matmul__(self, V):
            calls.append(V.shape[1] if V.dim() == 2 else 1)
            return A @ V

    with pytest.raises(ValueError, match=r"max_products must cover the sketch \(2 x "
                                         r"sketch_products = 40\) and two blocks \(2 x "
                                         r"block_size = 32\), at least 72; got 50"):
        pyflat.adaptive_trace(Counting(), 1e-3, max_products=50, seed=0)
    assert calls == []  # refused before any product
    est = pyflat.adaptive_trace(Counting(), 1e-9, max_products=72, seed=0)
    assert est.products == sum(calls) == 72 and est.converged is False
    with pytest.raises(ValueError, match="max_products must be an int >= 1, got 0"):
        pyflat.adaptive_trace(A, 0.1, max_products=0)
