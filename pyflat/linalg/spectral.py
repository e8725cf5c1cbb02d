"""Stochastic Lanczos quadrature (SLQ): spectral density, trace and numerical rank.

For a unit probe q, m Lanczos steps give nodes theta_l (eigenvalues of the tridiagonal
T) and weights tau_l (squared first components of its eigenvectors) with
sum_l tau_l f(theta_l) ~ q^T f(A) q: a Gaussian quadrature of the spectral measure of
A seen from q (Golub & Meurant; Ubaru, Chen & Saad 2017). Averaged over random probes it
estimates the spectral density (1/n) sum_i delta(t - lambda_i). All probes advance
together: every Lanczos step is one block product A @ [q_1 ... q_k].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .._progress import progress_bar
from .lanczos import LanczosRuns, _check_operator, _generator, tridiagonal
from .operator import operator_block_size

__all__ = ["SpectralDensity", "slq", "exact_rank"]


@dataclass
class SpectralDensity:
    """Quadrature nodes and weights of an SLQ run.

    Attributes:
        nodes: (probes, m) float64; entries past a probe's breakdown are NaN.
        weights: (probes, m) float64, each row summing to 1 (NaN-padded likewise).
        dimension: n, the operator's size.
        settings: the arguments of the run (steps, probes, seed, ...), for the record.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    dimension: int
    settings: dict

    @property
    def num_probes(self) -> int:
        """The number of probes (rows of ``nodes``)."""
        return self.nodes.shape[0]

    def _per_probe(self, values: torch.Tensor) -> torch.Tensor:
        """sum_l tau_l values_l per probe (NaN padding ignored)."""
        mask = torch.isfinite(self.nodes)
        return torch.where(mask, self.weights * values, torch.zeros_like(values)).sum(1)

    def _mean_stderr(self, per_probe: torch.Tensor) -> tuple[float, float]:
        k = per_probe.numel()
        stderr = float(per_probe.std(unbiased=True)) / math.sqrt(k) if k > 1 else math.inf
        return float(per_probe.mean()), stderr

    def trace(self) -> tuple[float, float]:
        """n * mean_i sum_l tau_il theta_il and its standard error."""
        mean, stderr = self._mean_stderr(self._per_probe(torch.nan_to_num(self.nodes)))
        return self.dimension * mean, self.dimension * stderr

    def spectral_bounds(self) -> tuple[float, float]:
        """Smallest and largest node over all probes: the extreme Ritz values, which
        converge first and bound the spectrum from inside."""
        finite = self.nodes[torch.isfinite(self.nodes)]
        return float(finite.min()), float(finite.max())

    def mass_outside(self, eps: float) -> tuple[float, float]:
        """Fraction of the spectrum with |lambda| > eps, and its standard error."""
        outside = (torch.nan_to_num(self.nodes).abs() > eps).to(torch.float64)
        return self._mean_stderr(self._per_probe(outside))

    def resolution(self) -> float:
        """How close to zero the quadrature resolves: the median over probes of the
        smallest |node|. A null space is seen as a heavy node there, not at 0, so mass
        below about this scale cannot be told from zero."""
        smallest = torch.nan_to_num(self.nodes, nan=math.inf).abs().min(1).values
        return float(smallest.median())

    def rank(self, rtol: float = 1e-3, spectral_norm: float | None = None) -> dict:
        """Numerical rank: n times the spectral mass outside [-eps, eps], with eps =
        rtol * ||A||_2 (``spectral_norm``, or the largest |node| when not given).

        The estimate is meaningful only where eps is well above the quadrature's
        resolution near zero (``resolved``: eps >= 10 x :meth:`resolution`); more
        Lanczos steps resolve smaller eps. Compare with :func:`exact_rank` on small
        models.

        Returns a dict with the estimate, its standard error, eps, rtol, the norm used,
        the resolution, whether eps is resolved and the dimension.
        """
        if spectral_norm is None:
            low, high = self.spectral_bounds()
            spectral_norm = max(abs(low), abs(high))
        eps = rtol * spectral_norm
        mass, stderr = self.mass_outside(eps)
        resolution = self.resolution()
        return {"rank": self.dimension * mass, "stderr": self.dimension * stderr,
                "eps": eps, "rtol": rtol, "spectral_norm": spectral_norm,
                "resolution": resolution, "resolved": eps >= 10 * resolution,
                "dimension": self.dimension}

    def density(self, grid: torch.Tensor | None = None, *, convention: str = "papyan",
                num_points: int = 1024, sigma_squared: float = 1e-5, kappa: float = 3.0,
                margin: float = 0.05) -> dict:
        """The spectral density smoothed with Gaussian kernels, on a grid.

        Conventions for the kernel width:

        * ``"papyan"`` (Papyan 2020, section D.2): the spectrum [lambda_min, lambda_max]
          (extreme nodes) is padded by ``margin`` of its width and mapped to [-1, 1],
          where the kernel's standard deviation is 2 / (m - 1) / sqrt(8 ln kappa) for m
          nodes per probe; ``kappa = 3``.
        * ``"ghorbani"`` (Ghorbani, Krishnan & Xiao 2019, their released code): the kernel
          variance is ``sigma_squared * max(1, lambda_max - lambda_min)`` with
          ``sigma_squared = 1e-5``, on a grid from lambda_min - 0.01 to lambda_max + 0.01
          (the means over probes of each probe's extreme nodes).

        Unlike the released codes, the density is not renormalized on the grid: with
        weights summing to one and unit-mass kernels it integrates to one up to kernel
        mass beyond the grid, so values stay comparable across grids.

        Returns:
            dict with ``grid`` (num_points,), ``density`` (mean over probes),
            ``stderr`` (standard error over probes, the error band), ``per_probe``
            (probes, num_points), ``sigma`` (kernel standard deviation) and
            ``convention``.
        """
        nodes = torch.nan_to_num(self.nodes)
        weights = torch.where(torch.isfinite(self.nodes), self.weights,
                              torch.zeros_like(self.weights))
        m = self.nodes.shape[1]
        if convention == "papyan":
            low, high = self.spectral_bounds()
            # a spectrum of zero width (a zero operator, a multiple of the identity) would
            # get a kernel of zero width; it gets a window of 1e-3 max(1, |lambda|) instead
            least = 1e-3 * max(1.0, abs(low), abs(high))
            if high - low < least:
                center = (low + high) / 2
                low, high = center - least / 2, center + least / 2
            pad = margin * (high - low)
            low, high = low - pad, high + pad
            half = (high - low) / 2
            sigma = half * 2 / max(m - 1, 1) / math.sqrt(8 * math.log(kappa))
        elif convention == "ghorbani":
            finite = torch.isfinite(self.nodes)
            high_each = torch.where(finite, self.nodes, torch.full_like(nodes, -math.inf)).max(1)
            low_each = torch.where(finite, self.nodes, torch.full_like(nodes, math.inf)).min(1)
            low = float(low_each.values.mean()) - 1e-2
            high = float(high_each.values.mean()) + 1e-2
            sigma = math.sqrt(sigma_squared * max(1.0, high - low))
        else:
            raise ValueError(f"convention must be 'papyan' or 'ghorbani', got {convention!r}")
        if grid is None:
            grid = torch.linspace(low, high, num_points, dtype=torch.float64)
        grid = grid.to(torch.float64)
        z = (grid.view(1, 1, -1) - nodes.unsqueeze(-1)) / sigma
        kernel = torch.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
        per_probe = (weights.unsqueeze(-1) * kernel).sum(1)
        k = per_probe.shape[0]
        stderr = per_probe.std(0, unbiased=True) / math.sqrt(k) if k > 1 else \
            torch.full_like(grid, math.inf)
        return {"grid": grid, "density": per_probe.mean(0), "stderr": stderr,
                "per_probe": per_probe, "sigma": sigma, "convention": convention}

    def plot(self, path, *, title: str | None = None, log_scale: bool = True,
             floor: float = 1e-8, **density_kwargs) -> None:
        """Writes a PNG of the density with its error band over probes (log-scale
        density, as papers show it). Needs matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        d = self.density(**density_kwargs)
        grid, mean, err = d["grid"].numpy(), d["density"].numpy(), d["stderr"].numpy()
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        if np.isfinite(err).all():  # one probe has no error band
            ax.fill_between(grid, (mean - err).clip(min=floor), mean + err, alpha=0.3,
                            linewidth=0, label="± standard error over probes")
        ax.plot(grid, mean.clip(min=floor), linewidth=1.2, label="SLQ density")
        if log_scale:
            ax.set_yscale("log")
            top = float(np.nan_to_num(mean + err, posinf=0.0).max())
            ax.set_ylim(floor, 3 * max(top, float(mean.max()), floor))
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        s = self.settings
        ax.set_title(title or f"{self.num_probes} probes x {s.get('num_steps')} steps, "
                              f"{d['convention']} kernel (sigma={d['sigma']:.2g})")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def slq(A, num_probes: int = 10, num_steps: int = 80, *, distribution: str = "rademacher",
        seed: int | None = None, generator: torch.Generator | None = None,
        reorthogonalize: bool = True, basis_dtype: torch.dtype = torch.float64,
        basis_device: str | torch.device | None = None,
        memory_budget: int = 2 << 30, progress: bool | None = None) -> SpectralDensity:
    """Stochastic Lanczos quadrature with ``num_probes`` probes of ``num_steps`` steps.

    The probes advance together, one block product per step. With ``reorthogonalize``
    every probe keeps its basis (probes x steps x n entries of ``basis_dtype``) and
    orthogonalizes twice against it; without, only the three-term recurrence runs, in
    O(n) memory per probe: the quadrature tolerates the lost orthogonality (Ghorbani et
    al. 2019), outlier counts and Ritz values do not. Probes are split into groups so
    that the bases of a group fit in ``memory_budget`` bytes and a group's block is one
    product call of the operator (``A.block_size()``).

    Defaults follow Ghorbani et al. 2019 (about 10 probes x 80-100 steps). ``progress``
    shows a bar on stderr (None: only on a terminal).

    Example:
        >>> sd = pyflat.slq(pyflat.Hessian(model, (X, y)), 10, 80, seed=0)
        >>> sd.trace(), sd.rank(rtol=1e-3)["rank"]
        >>> sd.plot("density.png")
    """
    n = _check_operator(A, "pyflat.slq")
    for name, value, low in (("num_probes", num_probes, 1), ("num_steps", num_steps, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"pyflat.slq: {name} must be an int >= {low}, got {value!r}")
    if num_steps > n:
        raise ValueError(f"pyflat.slq: num_steps must be at most the dimension {n}, got "
                         f"{num_steps}")
    if basis_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"pyflat.slq: basis_dtype must be torch.float32 or torch.float64, got "
                         f"{basis_dtype}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError("pyflat.slq: distribution must be 'rademacher' or 'gaussian', got "
                         f"{distribution!r}")
    gen = _generator(seed, generator)
    device = torch.device(basis_device) if basis_device is not None else torch.device(A.device)
    item = torch.finfo(basis_dtype).bits // 8
    per_probe = num_steps * n * item if reorthogonalize else 3 * n * 8
    group = max(1, min(num_probes, memory_budget // max(per_probe, 1),
                       operator_block_size(A) or num_probes))
    if distribution == "rademacher":
        probes = torch.randint(0, 2, (n, num_probes), generator=gen).to(torch.float64) * 2 - 1
    else:
        probes = torch.randn(n, num_probes, generator=gen, dtype=torch.float64)
    nodes, weights = [], []
    bar = progress_bar(num_steps * ((num_probes + group - 1) // group), "pyflat.slq", progress)
    for start in range(0, num_probes, group):
        block = probes[:, start:start + group].to(device)
        runs = LanczosRuns(A, block, caller="pyflat.slq", reorthogonalize=reorthogonalize,
                           basis_dtype=basis_dtype, capacity=num_steps)
        runs.run(num_steps, bar)
        alpha, beta = runs.coefficients()
        lengths = runs.lengths
        for j in range(block.shape[1]):
            m = lengths[j]
            theta, S = torch.linalg.eigh(tridiagonal(alpha[:m, j], beta[: m - 1, j]))
            row_nodes = torch.full((num_steps,), math.nan, dtype=torch.float64)
            row_weights = torch.full((num_steps,), math.nan, dtype=torch.float64)
            row_nodes[:m] = theta
            row_weights[:m] = S[0] ** 2
            nodes.append(row_nodes)
            weights.append(row_weights)
    bar.close()
    settings = {"num_probes": num_probes, "num_steps": num_steps, "distribution": distribution,
                "seed": seed, "reorthogonalize": reorthogonalize,
                "basis_dtype": str(basis_dtype).replace("torch.", ""), "products": num_probes *
                num_steps}
    return SpectralDensity(torch.stack(nodes), torch.stack(weights), n, settings)


def exact_rank(A, rtol: float = 1e-3) -> dict:
    """Numerical rank from a dense eigendecomposition (small operators): the number of
    eigenvalues with |lambda| > rtol * max |lambda|."""
    n = _check_operator(A, "pyflat.exact_rank")
    dense = A.to_dense() if hasattr(A, "to_dense") else A
    eigenvalues = torch.linalg.eigvalsh(dense.to(torch.float64))
    norm = float(eigenvalues.abs().max())
    eps = rtol * norm
    return {"rank": int((eigenvalues.abs() > eps).sum()), "eps": eps, "rtol": rtol,
            "spectral_norm": norm, "dimension": n, "eigenvalues": eigenvalues}
