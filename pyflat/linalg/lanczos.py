"""Lanczos with full reorthogonalization, and eigsh-style extreme eigenpairs.

Lanczos (1950) builds an orthonormal basis Q_m of the Krylov space span{q, Aq, ...,
A^{m-1} q} in which A is tridiagonal, T_m = Q_m A Q_m^T; the eigenvalues of T_m (Ritz
values) converge to A's extreme eigenvalues first, and |beta_m s_m| bounds each Ritz
pair's residual (Parlett 1998, The Symmetric Eigenvalue Problem). One core,
:class:`LanczosRuns`, serves ``lanczos``, ``eigsh`` and stochastic Lanczos quadrature.

Works on anything with the linear-operator protocol (``shape``, ``dtype``, ``device`` and
``@`` on (n,) vectors), a dense symmetric tensor included. The Krylov basis and the
tridiagonal coefficients are float64 whatever the precision of the products, and every
new vector is orthogonalized twice against the whole basis ("twice is enough",
Parlett 1998), so no ghost copies of converged eigenvalues appear.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._progress import progress_bar

__all__ = ["EigshResult", "LanczosResult", "LanczosRuns", "eigsh", "lanczos"]

# A residual below this fraction of ||A|| counts as a breakdown (an invariant subspace).
_BREAKDOWN_RTOL = 1e-10


def tridiagonal(alpha: torch.Tensor, off_diagonal: torch.Tensor) -> torch.Tensor:
    """The symmetric tridiagonal matrix with diagonal alpha (m,) and off-diagonal (m-1,)."""
    return torch.diag(alpha) + torch.diag(off_diagonal, 1) + torch.diag(off_diagonal, -1)


@dataclass
class LanczosResult:
    """A Lanczos run: A Q_m^T ~= Q_m^T T with T = tridiag(beta, alpha, beta).

    Attributes:
        alpha: (m,) float64 diagonal of T.
        beta: (m,) float64; beta[j] couples steps j and j+1 (beta[-1] is the residual
            norm of the last step, the factor of every Ritz residual bound). A zero
            inside marks a breakdown after which the run continued from a fresh vector
            orthogonal to the basis.
        basis: (m, n) orthonormal rows (the Lanczos vectors), or None when not kept.
        breakdowns: step indices after which an invariant subspace was found.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    basis: torch.Tensor | None
    breakdowns: list[int]

    @property
    def steps(self) -> int:
        """m, the number of steps (products) the run took."""
        return self.alpha.numel()

    def tridiagonal(self) -> torch.Tensor:
        """T (m, m) float64: alpha on the diagonal, beta[:-1] beside it."""
        return tridiagonal(self.alpha, self.beta[:-1])

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ritz values (ascending), eigenvectors S of T, and residual bounds
        |beta_m S[m-1, i]| = ||A x_i - theta_i x_i|| for unit Ritz vectors x_i."""
        theta, S = torch.linalg.eigh(self.tridiagonal())
        return theta, S, (self.beta[-1] * S[-1, :]).abs()


def _check_operator(A, caller: str) -> int:
    shape = getattr(A, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        raise TypeError(f"{caller}: A must be a square linear operator or tensor with .shape "
                        f"(n, n), got {type(A).__name__} with shape {shape}")
    if not isinstance(getattr(A, "dtype", None), torch.dtype) or not hasattr(A, "device"):
        hint = "; torch.from_numpy(A) converts it" if type(A).__module__ == "numpy" else ""
        raise TypeError(f"{caller}: A must be a pyflat operator or a torch.Tensor (a torch "
                        f".dtype and a .device), got {type(A).__name__}{hint}")
    return int(shape[0])


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None and seed is not None:
        raise ValueError("give either seed or generator, not both")
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


class _Basis:
    """The Lanczos vectors of k runs, as rows of (k, rows, n) chunks allocated as the runs
    grow: extending never copies, so memory peaks at the basis plus one chunk (the basis a
    run that is extended in steps of s rows ends with, plus s rows), not at twice the
    basis. The rows may be float32 (``basis_dtype``) to halve the memory of SLQ."""

    def __init__(self, n: int, k: int, dtype: torch.dtype, device: torch.device):
        self.n, self.k, self.dtype, self.device = n, k, dtype, device
        self.chunks: list[torch.Tensor] = []
        self.capacity = 0

    def reserve(self, rows: int) -> None:
        if rows > self.capacity:
            self.chunks.append(torch.zeros(self.k, rows - self.capacity, self.n,
                                           dtype=self.dtype, device=self.device))
            self.capacity = rows

    def _pieces(self, rows: int):
        """(start, (k, r, n) chunk) covering the first ``rows`` rows."""
        start = 0
        for chunk in self.chunks:
            if start >= rows:
                return
            yield start, chunk[:, : rows - start]
            start += chunk.shape[1]

    def set_rows(self, j: int, Q: torch.Tensor) -> None:
        """Row j of every run from the columns of Q (n, k)."""
        for start, piece in self._pieces(j + 1):
            if j < start + piece.shape[1]:
                piece[:, j - start].copy_(Q.T)
                return
        raise IndexError(j)

    def orthogonalize(self, W: torch.Tensor, rows: int, columns=slice(None)) -> torch.Tensor:
        """Each column of W (n, k) minus its projection on the first ``rows`` rows of its
        own run, twice (twice is enough); ``columns`` picks runs for a W of fewer columns."""
        for _ in range(2):
            Wt = W.T.to(self.dtype).unsqueeze(-1)                       # (k, n, 1)
            coef = [piece[columns] @ Wt for _, piece in self._pieces(rows)]  # (k, r, 1)
            for (_, piece), c in zip(self._pieces(rows), coef):
                W = W - (piece[columns].transpose(1, 2) @ c).squeeze(-1).T.to(W.dtype)
        return W

    def combine(self, S: torch.Tensor, column: int = 0) -> torch.Tensor:
        """Q[:m]^T S for S (m, r) of one run: Ritz vectors from its first m rows."""
        out = torch.zeros(self.n, S.shape[1], dtype=torch.float64, device=self.device)
        for start, piece in self._pieces(S.shape[0]):
            rows = piece[column].to(torch.float64)
            out += rows.T @ S[start: start + rows.shape[0]].to(self.device)
        return out

    def rows(self, m: int, column: int = 0) -> torch.Tensor:
        """The first m rows of one run as one (m, n) tensor: a view where one chunk holds
        them."""
        pieces = [piece[column] for _, piece in self._pieces(m)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class LanczosRuns:
    """k independent Lanczos runs on the columns of a start block, advanced together: each
    step is one block product A @ Q (n, k), so SLQ's probes share every product.

    Each run computes A Q_m^T = Q_m^T T_m + beta_m q_{m+1} e_m^T with T_m tridiagonal
    (alpha on the diagonal, beta beside it), in float64 whatever the products' dtype.
    With ``reorthogonalize`` each run keeps its basis (rows of ``basis_dtype``) and every
    new vector is orthogonalized twice against it (Parlett 1998); without, only the
    three-term recurrence runs, in O(n) memory per run.

    A residual below 1e-10 x the running estimate of ||A|| is a breakdown: the Krylov
    space is invariant. With a ``restart`` generator the run goes on from a fresh random
    vector orthogonal to its basis (beta = 0 there: T decouples), which is how copies of
    a repeated eigenvalue are found; without, the run stops, its quadrature exact. A run
    that spans the whole space stops either way.
    """

    def __init__(self, A, start: torch.Tensor, *, caller: str, reorthogonalize: bool = True,
                 basis_dtype: torch.dtype = torch.float64,
                 restart: torch.Generator | None = None, capacity: int = 0):
        n, k = start.shape
        if restart is not None and not reorthogonalize:
            raise ValueError("restarting after a breakdown needs the basis (reorthogonalize)")
        self.A, self.n, self.k, self.caller, self.restart = A, n, k, caller, restart
        self.device = start.device
        self.Q = _Basis(n, k, basis_dtype, start.device) if reorthogonalize else None
        if self.Q is not None:
            self.Q.reserve(capacity)
        self.q = start.to(torch.float64) / torch.linalg.vector_norm(start, dim=0)
        self.q_prev = torch.zeros_like(self.q)
        self.alpha: list[torch.Tensor] = []   # per step, (k,) float64 on the CPU
        self.beta: list[torch.Tensor] = []
        self.active = torch.ones(k, dtype=torch.bool)
        #: per run, the steps it took (until a stop or the whole space)
        self.lengths = [0] * k
        #: per run, the steps after which an invariant subspace was found
        self.breakdowns: list[list[int]] = [[] for _ in range(k)]
        self.scale = torch.zeros(k, dtype=torch.float64)  # running ||A|| estimates

    @property
    def steps(self) -> int:
        """Steps taken so far (the longest run's length)."""
        return len(self.alpha)

    @property
    def exhausted(self) -> bool:
        """Whether every run has stopped."""
        return not bool(self.active.any())

    def fresh_vector(self, column: int, rows: int) -> torch.Tensor | None:
        """A random unit vector orthogonal to the first ``rows`` rows of one run's basis,
        or None if they span everything."""
        for _ in range(3):
            w = torch.randn(self.n, generator=self.restart, dtype=torch.float64).to(self.device)
            if self.Q is not None:
                w = self.Q.orthogonalize(w.view(-1, 1), rows, slice(column, column + 1))[:, 0]
            norm = torch.linalg.vector_norm(w)
            if norm > 1e-8:
                return w / norm
        return None

    def run(self, until: int, bar=None) -> None:
        """Advances the active runs to ``until`` steps (at most n)."""
        until = min(until, self.n)
        if self.Q is not None:
            self.Q.reserve(until)
        while self.steps < until and not self.exhausted:
            j = self.steps
            q = self.q
            if self.Q is not None:
                self.Q.set_rows(j, q)
            block = q.to(dtype=self.A.dtype, device=self.A.device)
            # one run multiplies a vector: operators that take only (n,) vectors work too
            W = self.A @ block[:, 0] if self.k == 1 else self.A @ block
            W = W.to(dtype=torch.float64, device=self.device).view(self.n, self.k)
            if not bool(torch.isfinite(W).all()):
                raise ValueError(f"{self.caller}: A @ q returned NaN or inf at step {j}")
            a = (q * W).sum(0)
            W = W - a * q
            if j > 0:
                W = W - self.beta[j - 1].to(self.device) * self.q_prev
            if self.Q is not None:
                W = self.Q.orthogonalize(W, j + 1)
            b = torch.linalg.vector_norm(W, dim=0).cpu()
            a = a.cpu()
            self.scale = torch.maximum(self.scale, a.abs() + b + (self.beta[j - 1] if j else 0))
            stops = self.active & (b <= _BREAKDOWN_RTOL * self.scale.clamp(min=1e-300))
            if j + 1 == self.n:
                stops = self.active.clone()
            q_next = W / torch.where(stops | ~self.active, 1.0, b).to(self.device)
            for col in torch.nonzero(stops).flatten().tolist():
                fresh = None
                if self.restart is not None and j + 1 < self.n:
                    b[col] = 0.0  # T decouples here
                    self.breakdowns[col].append(j)
                    fresh = self.fresh_vector(col, j + 1)
                if fresh is None:
                    self.active[col] = False
                    self.lengths[col] = j + 1
                    q_next[:, col] = 0
                else:
                    q_next[:, col] = fresh
            q_next[:, ~self.active.to(self.device)] = 0
            self.alpha.append(a)
            self.beta.append(b)
            self.q_prev, self.q = q, q_next
            if bar is not None:
                bar.update(1)
        for col in torch.nonzero(self.active).flatten().tolist():
            self.lengths[col] = self.steps

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha and beta, each (steps, k) float64."""
        return torch.stack(self.alpha), torch.stack(self.beta)

    def result(self, column: int = 0, keep_basis: bool = True) -> LanczosResult:
        """One run's coefficients, basis and breakdowns."""
        m = self.lengths[column]
        alpha, beta = self.coefficients()
        basis = self.Q.rows(m, column) if keep_basis and self.Q is not None else None
        return LanczosResult(alpha[:m, column].clone(), beta[:m, column].clone(), basis,
                             list(self.breakdowns[column]))


def lanczos(A, num_steps: int, v0: torch.Tensor | None = None, *,
            seed: int | None = None, generator: torch.Generator | None = None,
            keep_basis: bool = True,
            basis_device: str | torch.device | None = None,
            progress: bool | None = None) -> LanczosResult:
    """Runs ``num_steps`` Lanczos steps on the symmetric operator A.

    Args:
        A: symmetric linear operator (pyflat operator, reference operator, dense tensor).
        num_steps: Krylov dimension m (at most n).
        v0: start vector (n,); a Gaussian draw from ``seed``/``generator`` if None.
        seed, generator: randomness for v0 and for fresh vectors after a breakdown.
        keep_basis: return the basis (it is needed during the run for
            reorthogonalization either way).
        basis_device: where the float64 basis lives (default: A's device; "cpu" keeps a
            GPU's memory free at the cost of transfers). It takes m x n x 8 bytes.
        progress: a progress bar on stderr (None: only on a terminal).

    Returns:
        LanczosResult with float64 coefficients; fewer than ``num_steps`` steps only when
        the whole space is spanned.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = pyflat.lanczos(A, 30, seed=0)
        >>> theta, _, bounds = res.ritz()  # theta[-1] ~ 100, bounds[-1] tiny
    """
    n = _check_operator(A, "pyflat.lanczos")
    if not isinstance(num_steps, int) or not 1 <= num_steps <= n:
        raise ValueError(f"pyflat.lanczos: num_steps must be an int in [1, {n}], got "
                         f"{num_steps!r}")
    state = _start(A, n, v0, seed, generator, basis_device, num_steps, "pyflat.lanczos")
    bar = progress_bar(num_steps, "pyflat.lanczos", progress)
    try:
        state.run(num_steps, bar)
    finally:
        bar.close()
    return state.result(keep_basis=keep_basis)


def _start(A, n, v0, seed, generator, basis_device, capacity, caller) -> LanczosRuns:
    """One run from v0, or from a Gaussian draw of the generator (which also draws the
    fresh vectors after breakdowns)."""
    gen = _generator(seed, generator)
    device = torch.device(basis_device) if basis_device is not None else torch.device(A.device)
    if v0 is None:
        q = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    else:
        if not isinstance(v0, torch.Tensor) or v0.shape != (n,):
            got = tuple(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__
            raise ValueError(f"{caller}: v0 must be a tensor of shape ({n},), got {got}")
        q = v0.detach().to(dtype=torch.float64, device=device)
        norm = torch.linalg.vector_norm(q)
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError(f"{caller}: v0 must be finite and non-zero")
    return LanczosRuns(A, q.view(-1, 1), caller=caller, restart=gen, capacity=capacity)


@dataclass
class EigshResult:
    """Extreme eigenpairs with their convergence evidence.

    Attributes:
        eigenvalues: (k,) float64, in the order scipy's eigsh returns them (ascending).
        eigenvectors: (n, k) float64 unit Ritz vectors, or None.
        residuals: (k,) bounds ||A x - theta x|| (|beta_m s_m|) per pair.
        converged: whether every residual met the tolerance and, after a breakdown, the
            unexplored complement cannot hold further copies that belong in the selection
            (see ``eigsh``).
        steps: Lanczos steps (products) used.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: bool
    steps: int


def _select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    order = torch.argsort(theta)
    if which == "LA":
        idx = order[-k:]
    elif which == "SA":
        idx = order[:k]
    elif which == "LM":
        idx = torch.argsort(theta.abs())[-k:]
    else:  # BE: half from each end, the extra one from the high end
        high = (k + 1) // 2
        idx = torch.cat([order[: k - high], order[len(order) - high:]])
    return idx[torch.argsort(theta[idx])]


def _complement_cannot_change(res: LanczosResult, selected: torch.Tensor, which: str,
                              tie: float) -> bool:
    """Whether the selection stays put if the complement of the closed blocks holds copies
    of the last closed block's eigenvalues (its only possible spectrum); values within
    ``tie`` of the selection's edge count as equal."""
    end = res.breakdowns[-1] + 1
    start = res.breakdowns[-2] + 1 if len(res.breakdowns) > 1 else 0
    hidden = torch.linalg.eigvalsh(tridiagonal(res.alpha[start:end], res.beta[start:end - 1]))
    lowest, highest = float(hidden[0]), float(hidden[-1])
    if which == "SA":
        return lowest >= float(selected[-1]) - tie
    if which == "LA":
        return highest <= float(selected[0]) + tie
    if which == "LM":
        return max(abs(lowest), abs(highest)) <= float(selected.abs().min()) + tie
    low = len(selected) - (len(selected) + 1) // 2  # BE: selected[:low] from the low end
    return (highest <= float(selected[low]) + tie
            and (low == 0 or lowest >= float(selected[low - 1]) - tie))


def eigsh(A, k: int = 6, which: str = "LA", ncv: int | None = None,
          v0: torch.Tensor | None = None, tol: float = 0.0, maxiter: int | None = None,
          return_eigenvectors: bool = True, *, seed: int | None = None,
          generator: torch.Generator | None = None,
          basis_device: str | torch.device | None = None,
          progress: bool | None = None) -> EigshResult:
    """k extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    Named as scipy.sparse.linalg.eigsh: ``which`` is 'LA' (largest algebraic), 'SA'
    (smallest algebraic: the Hessian's negative eigenvalues), 'LM' (largest magnitude) or
    'BE' (both ends). The Krylov space grows from ``ncv`` steps until every requested pair
    has a residual bound |beta_m s_m| <= tol * max(|theta|, ||T||) or ``maxiter`` steps
    were taken; ``converged`` says which.

    What ``converged`` guarantees: every returned pair has a residual bound within the
    tolerance, so an eigenvalue of A lies that close to each value. A single Krylov space
    holds only one copy of a repeated eigenvalue (in exact arithmetic), so copies are found
    through breakdowns: when the space becomes invariant, the run goes on from a fresh
    random vector orthogonal to the basis. The complement of a closed (invariant) block
    can only hold eigenvalues that the most recently closed block showed, since that block
    grew from a random vector in the complement then. So after a breakdown, ``converged``
    also requires that no copy of those values could enter the selection (or that the
    whole space was spanned); until then the run continues, and it reports
    ``converged=False`` if ``maxiter`` comes first. A low-rank operator's repeated zero
    eigenvalue (``which='SA'``) or a repeated top eigenvalue is found this way. Without a
    breakdown, a copy shows up only through rounding errors, as for ARPACK: multiplicity
    inside a Krylov space that never closes is not detected. The argument relies on a
    random start vector; a chosen ``v0`` orthogonal to an eigenvector voids it.

    Args:
        tol: relative tolerance; 0 means 100 x the unit roundoff of A's dtype (the
            residual cannot drop much below the products' own error).
        ncv: Krylov dimension at the first convergence check (default max(2k + 1, 8), at
            most n); the space then grows by ncv // 2 (at least 4) steps per check.
            Memory: the float64 basis, m x n x 8 bytes after m steps, and at most one
            growth step of rows more; the basis grows in chunks, never by copying.
        maxiter: most Lanczos steps (products) in all (default min(n, max(10 ncv, 200))).
        progress: a progress bar on stderr (None: only on a terminal).

    Example:
        >>> H = pyflat.Hessian(model, (X, y))
        >>> res = pyflat.eigsh(H, k=5, which="LA", seed=0)
        >>> res.eigenvalues, res.residuals
    """
    n = _check_operator(A, "pyflat.eigsh")
    if which not in ("LA", "SA", "LM", "BE"):
        raise ValueError(f"pyflat.eigsh: which must be 'LA', 'SA', 'LM' or 'BE', got {which!r}")
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"pyflat.eigsh: k must be an int in [1, {n}], got {k!r}")
    ncv = min(n, max(2 * k + 1, 8)) if ncv is None else ncv
    if not isinstance(ncv, int) or not k <= ncv <= n:
        raise ValueError(f"pyflat.eigsh: ncv must be an int in [k={k}, n={n}], got {ncv!r}")
    maxiter = min(n, max(10 * ncv, 200)) if maxiter is None else maxiter
    if not isinstance(maxiter, int) or maxiter < ncv:
        raise ValueError(f"pyflat.eigsh: maxiter must be an int >= ncv={ncv}, got {maxiter!r}")
    maxiter = min(maxiter, n)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"pyflat.eigsh: tol must be a number >= 0 (0: 100 x the unit "
                        f"roundoff), got {type(tol).__name__} {tol!r}")
    if tol < 0 or not math.isfinite(tol):
        raise ValueError(f"pyflat.eigsh: tol must be a finite number >= 0, got {tol!r}")
    rtol = tol if tol > 0 else 100 * torch.finfo(A.dtype).eps

    state = _start(A, n, v0, seed, generator, basis_device, ncv, "pyflat.eigsh")
    target = ncv
    bar = progress_bar(None, f"pyflat.eigsh k={k} {which}", progress)
    while True:
        state.run(target, bar)
        res = state.result(keep_basis=False)
        theta, S, bounds = res.ritz()
        idx = _select(theta, min(k, res.steps), which)
        norm_T = float(theta.abs().max())
        limit = rtol * torch.clamp(theta[idx].abs(), min=norm_T * 1e-3)
        converged = bool((bounds[idx] <= limit).all())
        if converged and res.breakdowns and not state.exhausted:
            # Bounds of a closed block read 0, but copies may hide in the complement.
            tie = max(rtol, _BREAKDOWN_RTOL) * norm_T
            converged = _complement_cannot_change(res, theta[idx], which, tie)
        bar.set_postfix_str(f"worst residual {float((bounds[idx] / limit).max()):.1e} x tol")
        if converged or state.exhausted or res.steps >= maxiter:
            bar.close()
            break
        target = min(maxiter, res.steps + max(ncv // 2, 4))
    vectors = None
    if return_eigenvectors:
        vectors = state.Q.combine(S[:, idx])
    return EigshResult(theta[idx], vectors, bounds[idx], converged, res.steps)
