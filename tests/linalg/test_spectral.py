"""Stochastic Lanczos quadrature: quadrature identities, density, rank, and a real GGN."""
import pytest
import torch

import pyflat
from pyflat.linalg.lanczos import LanczosRuns, tridiagonal

from helpers import symmetric


def block_lanczos(A, probes, steps):
    """Independent reorthogonalized runs on the columns of probes, as SLQ runs them."""
    runs = LanczosRuns(A, probes, caller="test", capacity=steps)
    runs.run(steps)
    return (*runs.coefficients(), runs.lengths)


def quadrature(alpha, beta, lengths, j):
    """Nodes and weights of probe j from a block Lanczos run."""
    m = lengths[j]
    theta, S = torch.linalg.eigh(tridiagonal(alpha[:m, j], beta[: m - 1, j]))
    return theta, S[0] ** 2


def test_quadrature_identity_for_each_probe():
    """For a unit probe q: sum_l tau_l theta_l = q^T A q (and sum_l tau_l = 1)."""
    gen = torch.Generator().manual_seed(1)
    A = symmetric(torch.randn(120, generator=gen, dtype=torch.float64), seed=2)
    probes = torch.randn(120, 5, generator=gen, dtype=torch.float64)
    alpha, beta, lengths = block_lanczos(A, probes, 30)
    for j in range(5):
        theta, tau = quadrature(alpha, beta, lengths, j)
        q = probes[:, j] / probes[:, j].norm()
        assert abs(float(tau.sum()) - 1) < 1e-13
        assert abs(float((tau * theta).sum()) - float(q @ A @ q)) < 1e-12
        # and of the square: sum tau theta^2 = |A q|^2 (exact for m >= 2)
        assert abs(float((tau * theta ** 2).sum()) - float((A @ q).norm() ** 2)) < 1e-11


def test_trace_and_density_of_a_known_spectrum():
    ev = torch.cat([torch.zeros(100), torch.linspace(0.5, 1.0, 60), torch.linspace(4, 6, 8)])
    A = symmetric(ev.double(), seed=3)
    sd = pyflat.slq(A, 30, 40, seed=4)
    trace, stderr = sd.trace()
    assert abs(trace - float(ev.sum())) < 4 * stderr
    for convention in ("papyan", "ghorbani"):
        d = sd.density(convention=convention, num_points=4000)
        dx = float(d["grid"][1] - d["grid"][0])
        mass = float(d["density"].sum()) * dx
        assert 0.9 < mass <= 1.0 + 1e-6, (convention, mass)
        assert d["per_probe"].shape == (30, 4000) and torch.all(d["stderr"] >= 0)
    # the outliers carry 8/168 of the mass, in every probe's quadrature on average
    high = float(sd.mass_outside(3.0)[0])
    assert abs(high - 8 / 168) < 0.03


def test_rank_estimate_matches_a_low_rank_matrix():
    gen = torch.Generator().manual_seed(5)
    B = torch.randn(300, 24, generator=gen, dtype=torch.float64)
    A = B @ B.T  # rank 24 of 300
    sd = pyflat.slq(A, 20, 40, seed=6)
    est = sd.rank(rtol=1e-8)
    assert est["resolved"]  # an exact null space: Lanczos breaks down and finds it
    assert abs(est["rank"] - 24) < 3 * est["stderr"] + 0.5, est
    assert pyflat.exact_rank(A, rtol=1e-8)["rank"] == 24


def test_modes_without_reorthogonalization_and_with_float32_basis_in_chunks():
    A = symmetric(torch.linspace(-1, 3, 150, dtype=torch.float64) ** 3, seed=7)
    full = pyflat.slq(A, 8, 30, seed=8)
    plain = pyflat.slq(A, 8, 30, seed=8, reorthogonalize=False)
    chunked = pyflat.slq(A, 8, 30, seed=8, basis_dtype=torch.float32,
                         memory_budget=3 * 30 * 150 * 4)  # three probes per group
    t = float(torch.trace(A))
    for sd in (full, plain, chunked):
        trace, stderr = sd.trace()
        assert abs(trace - t) < 4 * stderr
    # the quadrature trace needs no orthogonality: all three agree closely
    assert abs(plain.trace()[0] - full.trace()[0]) < 1e-8 * abs(t) + 1e-8
    assert abs(chunked.trace()[0] - full.trace()[0]) < 1e-4 * abs(t) + 1e-4


def test_same_seed_same_density():
    A = symmetric(torch.linspace(0, 1, 60, dtype=torch.float64), seed=9)
    a, b = pyflat.slq(A, 4, 10, seed=3), pyflat.slq(A, 4, 10, seed=3)
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)


def test_plot_writes_a_png(tmp_path):
    A = symmetric(torch.linspace(0, 2, 80, dtype=torch.float64), seed=10)
    path = tmp_path / "density.png"
    pyflat.slq(A, 5, 20, seed=0).plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("value", [0.0, 5.0, -1e-9])
def test_a_spectrum_of_zero_width_has_a_finite_density_and_a_plot(value, tmp_path):
    # every node equal: the kernel used to get zero width and the density 1e300
    A = value * torch.eye(30, dtype=torch.float64)
    d = pyflat.slq(A, 3, 10, seed=0)
    r = d.density()
    assert torch.isfinite(r["density"]).all()
    grid, density = r["grid"], r["density"]
    assert abs(float(grid[density.argmax()]) - value) <= 1e-3 * max(1.0, abs(value))
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1.0, abs=1e-3)
    for probes in (3, 1):  # one probe: no error band
        path = tmp_path / f"density-{probes}.png"
        pyflat.slq(A, probes, 10, seed=0).plot(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slq_on_a_real_ggn_against_dense_eigendecomposition(digits_mlp):
    model, data = digits_mlp
    G = pyflat.GGN(model, data)
    exact = pyflat.exact_rank(G)
    sd = pyflat.slq(G, 20, 80, seed=1)
    trace, stderr = sd.trace()
    eigenvalues = exact["eigenvalues"]
    assert abs(trace - float(eigenvalues.sum())) < 4 * stderr
    est = sd.rank(rtol=1e-3, spectral_norm=exact["spectral_norm"])
    exact = pyflat.exact_rank(G, rtol=1e-3)
    assert est["resolved"]
    assert abs(est["rank"] - exact["rank"]) < 4 * est["stderr"] + 1, (est, exact["rank"])
    # far below the quadrature's resolution near zero the estimate says it is unresolved
    assert not sd.rank(rtol=1e-12, spectral_norm=exact["spectral_norm"])["resolved"]
    top = pyflat.eigsh(G, k=5, seed=0)
    torch.testing.assert_close(top.eigenvalues, eigenvalues[-5:], rtol=1e-9, atol=1e-12)


def test_slq_errors():
    A = torch.eye(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_steps must be at most the dimension 10, got 11"):
        pyflat.slq(A, 2, 11)
    with pytest.raises(ValueError, match="num_probes must be an int >= 1, got 0"):
        pyflat.slq(A, 0, 5)
    with pytest.raises(ValueError, match="basis_dtype must be torch.float32 or torch.float64"):
        pyflat.slq(A, 2, 5, basis_dtype=torch.float16)
    with pytest.raises(ValueError, match="convention must be 'papyan' or 'ghorbani'"):
        pyflat.slq(A, 2, 5, seed=0).density(convention="other")


def test_quadrature_identity_and_hutchinson_on_a_real_ggn(digits_mlp):
    model, data = digits_mlp
    G = pyflat.GGN(model, data)
    dense = G.to_dense()
    gen = torch.Generator().manual_seed(3)
    probes = torch.randn(G.shape[0], 3, generator=gen, dtype=torch.float64)
    alpha, beta, lengths = block_lanczos(G, probes, 40)
    for j in range(3):
        theta, tau = quadrature(alpha, beta, lengths, j)
        q = probes[:, j] / probes[:, j].norm()
        assert abs(float((tau * theta).sum()) - float(q @ dense @ q)) < 1e-12
    est = pyflat.hutchinson_trace(G, 300, seed=4)
    assert abs(est.value - float(torch.trace(dense))) < 4 * est.stderr
