"""Lanczos and eigsh on dense matrices and on real curvature operators."""
import numpy as np
import pytest
import scipy.sparse.linalg
import torch

import pyflat
from pyflat.linalg.lanczos import LanczosRuns, tridiagonal

from helpers import make_batch, make_mlp, symmetric


def test_full_krylov_space_reproduces_eigvalsh():
    gen = torch.Generator().manual_seed(1)
    A = symmetric(torch.randn(80, generator=gen, dtype=torch.float64) * 3)
    theta, _, _ = pyflat.lanczos(A, 80, seed=0).ritz()
    torch.testing.assert_close(theta, torch.linalg.eigvalsh(A), rtol=0, atol=1e-10)


def test_no_ghost_copies_of_separated_outliers():
    """10 outliers above a bulk of 400: after 100 steps each outlier is one Ritz value,
    where Lanczos without reorthogonalization repeats converged ones."""
    gen = torch.Generator().manual_seed(2)
    outliers = torch.linspace(20.0, 38.0, 10, dtype=torch.float64)
    bulk = torch.rand(400, generator=gen, dtype=torch.float64)
    A = symmetric(torch.cat([bulk, outliers]), seed=3)
    theta, _, bounds = pyflat.lanczos(A, 100, seed=4).ritz()
    for value in outliers:
        near = (theta - value).abs() < 0.5
        assert int(near.sum()) == 1, (value, theta[near])
    assert int((theta > 1.5).sum()) == 10
    torch.testing.assert_close(theta[-10:], outliers, rtol=0, atol=1e-10)
    assert bounds[-10:].max() < 1e-8


def test_ritz_residual_bounds_equal_true_residuals():
    A = symmetric(torch.linspace(-2, 7, 50, dtype=torch.float64), seed=5)
    res = pyflat.lanczos(A, 20, seed=6)
    theta, S, bounds = res.ritz()
    X = res.basis.T @ S
    true = torch.linalg.vector_norm(A @ X - X * theta, dim=0)
    torch.testing.assert_close(bounds, true, rtol=1e-6, atol=1e-12)


def test_breakdown_on_low_rank_matrix_is_handled():
    gen = torch.Generator().manual_seed(7)
    B = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    A = B @ B.T
    res = pyflat.lanczos(A, 12, seed=8)
    # Krylov space of a random v0: the range (dimension 4) plus v0's null-space part
    assert res.breakdowns and res.breakdowns[0] == 4
    theta = res.ritz()[0]
    torch.testing.assert_close(theta[-4:], torch.linalg.eigvalsh(A)[-4:], rtol=1e-12, atol=0)
    Q = res.basis
    torch.testing.assert_close(Q @ Q.T, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_eigsh_matches_scipy(which):
    ev = torch.cat([torch.linspace(-9, -4, 5), torch.linspace(-1, 1, 190),
                    torch.linspace(3, 12, 5)]).double()
    A = symmetric(ev, seed=9)
    res = pyflat.eigsh(A, k=4, which=which, seed=0)
    expected = scipy.sparse.linalg.eigsh(A.numpy(), k=4, which=which, return_eigenvectors=False,
                                         tol=1e-12)
    assert res.converged
    np.testing.assert_allclose(res.eigenvalues.numpy(), np.sort(expected), rtol=0, atol=1e-10)
    vectors = res.eigenvectors
    residual = torch.linalg.vector_norm(A @ vectors - vectors * res.eigenvalues, dim=0)
    assert residual.max() < 1e-9


def test_eigsh_on_a_real_hessian_finds_negative_eigenvalues():
    model = make_mlp([6, 12, 4], "tanh", seed=10)
    data = make_batch(40, 6, 4)
    H = pyflat.Hessian(model, data)
    dense = torch.linalg.eigvalsh(H.to_dense())
    assert dense[0] < 0  # a Hessian away from a minimum is indefinite
    low = pyflat.eigsh(H, k=3, which="SA", seed=1)
    high = pyflat.eigsh(H, k=3, which="LA", seed=1)
    assert low.converged and high.converged
    torch.testing.assert_close(low.eigenvalues, dense[:3], rtol=0, atol=1e-10)
    torch.testing.assert_close(high.eigenvalues, dense[-3:], rtol=0, atol=1e-10)


def test_eigsh_on_float32_ggn_agrees_with_scipy_on_to_scipy():
    model = make_mlp([8, 16, 5], "relu", dtype=torch.float32, seed=11)
    data = make_batch(64, 8, 5, dtype=torch.float32)
    G = pyflat.GGN(model, data)
    res = pyflat.eigsh(G, k=3, seed=2)
    ref = scipy.sparse.linalg.eigsh(G.to_scipy(), k=3, which="LA", return_eigenvectors=False)
    assert res.converged
    assert res.eigenvalues.dtype == torch.float64
    np.testing.assert_allclose(res.eigenvalues.numpy(), np.sort(ref), rtol=1e-5)


def test_same_seed_same_numbers():
    A = symmetric(torch.linspace(0, 1, 30, dtype=torch.float64) ** 3, seed=12)
    a = pyflat.lanczos(A, 10, seed=5)
    b = pyflat.lanczos(A, 10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.alpha, b.alpha) and torch.equal(a.beta, b.beta)


@pytest.mark.parametrize("kwargs, message", [
    ({"which": "XX"}, "which must be 'LA', 'SA', 'LM' or 'BE', got 'XX'"),
    ({"k": 0}, r"k must be an int in \[1, 10\], got 0"),
    ({"k": 3, "ncv": 2}, r"ncv must be an int in \[k=3, n=10\], got 2"),
    ({"v0": torch.ones(9)}, r"v0 must be a tensor of shape \(10,\), got \(9,\)"),
    ({"tol": -1.0}, "tol must be a finite number >= 0, got -1.0"),
])
def test_eigsh_errors(kwargs, message):
    A = torch.eye(10, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        pyflat.eigsh(A, **kwargs)


def test_lanczos_refuses_non_square():
    with pytest.raises(TypeError, match=r"A must be a square linear operator"):
        pyflat.lanczos(torch.zeros(3, 4), 2)


def test_progress_bars_only_when_asked_or_on_a_terminal(capsys):
    A = symmetric(torch.linspace(0, 1, 40, dtype=torch.float64), seed=14)
    pyflat.eigsh(A, k=2, seed=0)  # stderr is not a terminal under pytest: silent
    pyflat.slq(A, 2, 10, seed=0)
    pyflat.adaptive_trace(A, 0.05, seed=0)
    assert capsys.readouterr().err == ""
    pyflat.eigsh(A, k=2, seed=0, progress=True)
    pyflat.slq(A, 2, 10, seed=0, progress=True)
    pyflat.adaptive_trace(A, 0.05, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "pyflat.eigsh" in err and "pyflat.slq" in err and "pyflat.adaptive_trace" in err


def _eigsh_selection(eigenvalues: np.ndarray, k: int, which: str) -> np.ndarray:
    """The k eigenvalues scipy's eigsh returns for `which`, from the full spectrum."""
    ev = np.sort(eigenvalues)
    if which == "LA":
        return ev[-k:]
    if which == "SA":
        return ev[:k]
    if which == "LM":
        return np.sort(ev[np.argsort(np.abs(ev), kind="stable")[-k:]])
    high = (k + 1) // 2  # BE: the extra one from the high end
    return np.sort(np.concatenate([ev[: k - high], ev[len(ev) - high:]]))


# Spectra with exact multiplicities; none has +-x pairs, so 'LM' has no ties.
REPEATED_SPECTRA = {
    "rank 5 of 50": [1.0, 2.0, 3.0, 4.0, 5.0] + [0.0] * 45,
    "rank 7 of 50": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0] + [0.0] * 43,
    "rank 1 of 50": [3.0] + [0.0] * 49,
    "triple top of 10": [5.0] * 3 + np.linspace(0.1, 0.9, 7).tolist(),
    "repeats at both ends": [-2.0] * 3 + [0.0] * 20 + [0.5, 1.5, 2.5, 3.5] + [4.0] * 3,
}


@pytest.mark.parametrize("ncv_is_k", [False, True], ids=["default_ncv", "ncv_k"])
@pytest.mark.parametrize("which", ["SA", "BE", "LA", "LM"])
@pytest.mark.parametrize("spectrum", list(REPEATED_SPECTRA), ids=str)
def test_eigsh_never_claims_convergence_on_a_wrong_selection(spectrum, which, ncv_is_k):
    """After a breakdown every residual bound is 0, yet the unexplored complement can hold
    further copies of a wanted eigenvalue: converged=True must mean the values are right."""
    eigenvalues = REPEATED_SPECTRA[spectrum]
    A = symmetric(eigenvalues, seed=15)
    dense = np.linalg.eigvalsh(A.numpy())
    for k in range(1, 5):
        for seed in range(2):
            res = pyflat.eigsh(A, k=k, which=which, seed=seed, ncv=k if ncv_is_k else None)
            if res.converged:
                np.testing.assert_allclose(res.eigenvalues.numpy(),
                                           _eigsh_selection(dense, k, which), rtol=0, atol=1e-8,
                                           err_msg=f"k={k} seed={seed}")


@pytest.mark.parametrize("which, rank, k, ncv", [
    ("SA", 5, 3, None), ("SA", 5, 3, 3), ("SA", 7, 3, None), ("SA", 7, 2, None),
    ("SA", 1, 4, None), ("SA", 1, 2, 2), ("BE", 5, 4, 4), ("BE", 1, 4, None),
    ("BE", 7, 4, 4), ("SA", 5, 1, 1),
])
def test_eigsh_finds_every_copy_of_a_repeated_zero_eigenvalue(which, rank, k, ncv):
    """Low-rank PSD: the zero eigenvalue has multiplicity n - rank, and a single Krylov
    space holds one copy; the others come from restarts after the breakdown."""
    n = 50
    A = symmetric(list(range(1, rank + 1)) + [0.0] * (n - rank), seed=16)
    dense = np.linalg.eigvalsh(A.numpy())
    res = pyflat.eigsh(A, k=k, which=which, ncv=ncv, seed=0)
    expected = _eigsh_selection(dense, k, which)
    assert res.converged
    np.testing.assert_allclose(res.eigenvalues.numpy(), expected, rtol=0, atol=1e-8)
    reference = scipy.sparse.linalg.eigsh(A.numpy(), k=k, which=which, tol=1e-12,
                                          return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(reference), expected, rtol=0, atol=1e-8)
    # the wanted copies are resolved without running through the whole space
    assert res.steps < n
    vectors = res.eigenvectors
    residual = torch.linalg.vector_norm(A @ vectors - vectors * res.eigenvalues, dim=0)
    assert residual.max() < 1e-8
    gram = vectors.T @ vectors
    torch.testing.assert_close(gram, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("which", ["LA", "LM", "BE"])
@pytest.mark.parametrize("k", [3, 4])
def test_eigsh_finds_every_copy_of_a_repeated_top_eigenvalue(which, k):
    """5 three times above 7 distinct values: the first Krylov space breaks down after 8
    steps, exactly at the first convergence check, holding a single 5."""
    eigenvalues = [5.0] * 3 + np.linspace(0.1, 0.9, 7).tolist()
    A = symmetric(eigenvalues, seed=17)
    expected = _eigsh_selection(np.array(eigenvalues), k, which)
    res = pyflat.eigsh(A, k=k, which=which, seed=0)
    assert res.converged
    np.testing.assert_allclose(res.eigenvalues.numpy(), expected, rtol=0, atol=1e-8)
    reference = scipy.sparse.linalg.eigsh(A.numpy(), k=k, which=which, tol=1e-12,
                                          return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(reference), expected, rtol=0, atol=1e-8)


def test_growing_the_krylov_space_never_copies_the_basis():
    from pyflat.linalg.lanczos import _start
    A = symmetric(torch.linspace(-1, 3, 60, dtype=torch.float64), seed=4)
    state = _start(A, 60, None, 0, None, None, 8, "test")
    state.run(8)
    first = state.Q.chunks[0].data_ptr()
    for until in (12, 16, 30):
        state.run(until)
    # the rows written before stay where they were; capacity is what was asked, no more
    assert state.Q.chunks[0].data_ptr() == first
    assert state.Q.capacity == sum(c.shape[1] for c in state.Q.chunks) == 30
    basis = state.result().basis
    assert basis.shape == (30, 60)
    assert torch.allclose(basis @ basis.T, torch.eye(30, dtype=torch.float64), atol=1e-12)
    # one run to 30 steps gives the same numbers as the run grown in steps
    whole = _start(A, 60, None, 0, None, None, 30, "test")
    whole.run(30)
    assert torch.allclose(torch.stack(whole.alpha), torch.stack(state.alpha), rtol=0,
                          atol=1e-12)


def test_runs_advanced_together_equal_runs_alone():
    """The one Lanczos core serves eigsh/lanczos (one run) and SLQ (a block of runs): each
    column of a block run is the run that column alone would give."""
    A = symmetric(torch.linspace(-2, 5, 80, dtype=torch.float64), seed=7)
    starts = torch.randn(80, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    together = LanczosRuns(A, starts, caller="test", capacity=25)
    together.run(25)
    alpha, beta = together.coefficients()
    for col in range(3):
        alone = LanczosRuns(A, starts[:, col:col + 1], caller="test", capacity=25)
        alone.run(25)
        a, b = alone.coefficients()
        assert torch.allclose(alpha[:, col], a[:, 0], rtol=0, atol=1e-12)
        assert torch.allclose(beta[:, col], b[:, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_runs_without_restart_stop_at_their_invariant_subspace(reorthogonalize):
    """Without a restart generator (SLQ) a run stops where its Krylov space is invariant:
    on a matrix with 4 distinct eigenvalues after at most 4 steps, its quadrature exact."""
    values = torch.tensor([0.0] * 20 + [1.0] * 10 + [3.0] * 5 + [-2.0] * 5, dtype=torch.float64)
    A = symmetric(values, seed=2)
    starts = torch.randn(40, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    runs = LanczosRuns(A, starts, caller="test", reorthogonalize=reorthogonalize, capacity=12)
    runs.run(12)
    assert runs.exhausted and runs.lengths == [4, 4, 4, 4]
    assert runs.steps == 4 and all(not b for b in runs.breakdowns)
    alpha, beta = runs.coefficients()
    for col in range(4):
        theta = torch.linalg.eigvalsh(tridiagonal(alpha[:4, col], beta[:3, col]))
        assert torch.allclose(theta, torch.tensor([-2.0, 0.0, 1.0, 3.0], dtype=torch.float64),
                              atol=1e-10)


def test_runs_with_restart_go_on_past_breakdowns_per_column():
    """With a restart generator each run continues from a fresh vector orthogonal to its
    own basis, and records where its space closed; runs in one block do so independently."""
    values = torch.tensor([0.0] * 10 + [1.0] * 10 + [2.0] * 10, dtype=torch.float64)
    A = symmetric(values, seed=5)
    starts = torch.randn(30, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    runs = LanczosRuns(A, starts, caller="test", restart=torch.Generator().manual_seed(9),
                       capacity=30)
    runs.run(30)
    for col in range(2):
        res = runs.result(col)
        assert res.breakdowns[0] == 2  # three distinct eigenvalues: closed after 3 steps
        assert torch.allclose(res.basis @ res.basis.T, torch.eye(res.steps, dtype=torch.float64),
                              atol=1e-10)
        theta = torch.linalg.eigvalsh(res.tridiagonal())
        # every copy of each eigenvalue is found, one per closed block
        for value in (0.0, 1.0, 2.0):
            assert int(((theta - value).abs() < 1e-8).sum()) == 10
