"""The operator protocol and its algebra: symmetric P x P linear operators over a flat
parameter vector.

Every operator follows one protocol (``shape``, ``dtype``, ``device``, ``@``, ``matvec``,
``matmat``, ``to_scipy()``, ``to_dense()``), on flat vectors (P,), blocks (P, k) and
parameter lists, so every algorithm in :mod:`pyflat.linalg` takes a curvature operator,
the autograd reference operators or a dense tensor alike. The flat layout is
``torch.cat([p.flatten() for p in model.parameters()])`` (:class:`ParameterLayout`,
``op.layout``).
"""
from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np
import torch

from .layout import ParameterLayout

__all__ = ["CurvatureOperator", "LinearCombination", "Restricted", "Vector", "operator_block_size"]

Vector = torch.Tensor | Sequence[torch.Tensor]


class CurvatureOperator(abc.ABC):
    """A symmetric P x P linear operator over a model's flattened parameters.

    Subclasses implement ``_matmat(V)`` for a (P, k) block V of their dtype and device;
    this class validates inputs and provides the rest of the protocol: products on
    vectors, blocks and parameter lists, scipy interop, a dense matrix for small P, and
    algebra (``A + B``, ``A - B``, ``c * A``, ``A.restrict(...)``) whose results are
    operators again. ``A @ x`` is :meth:`matmat` for a 2-D x and :meth:`matvec` otherwise.

    Args:
        layout: the flat parameter layout, or the parameters' shapes in layout order.
        dtype: the dtype every input must have and every product has.
        device: the device every input must be on and every product is on.
    """

    def __init__(self, layout: ParameterLayout | Sequence[torch.Size], dtype: torch.dtype,
                 device: torch.device):
        #: the flat parameter layout (names, shapes, offsets) directions follow
        self.layout = layout if isinstance(layout, ParameterLayout) else ParameterLayout(layout)
        #: shapes of the parameters, for the parameter-list form of ``matvec``
        self.param_shapes = self.layout.shapes
        #: the parameters the flat layout runs over, when the operator knows them
        self.parameters: list[torch.Tensor] | None = self.layout.parameters
        self._dim = self.layout.size
        self._dtype = dtype
        self._device = torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        """(P, P), with P the number of parameter entries in the layout."""
        return (self._dim, self._dim)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of inputs and products (that of the model's parameters)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The device of inputs and products."""
        return self._device

    @abc.abstractmethod
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """(P, k) -> (P, k) for V of the operator's dtype and device, already checked."""

    def _check_block(self, V: torch.Tensor, name: str) -> None:
        if not isinstance(V, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.{name}: expected a torch.Tensor, got "
                            f"{type(V).__name__}")
        if V.dtype != self.dtype:
            raise TypeError(f"{type(self).__name__}.{name}: expected dtype {self.dtype}, got "
                            f"{V.dtype}")
        if V.device != self.device:
            raise ValueError(f"{type(self).__name__}.{name}: expected a tensor on "
                             f"{self.device}, got one on {V.device}")

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Applies the operator to a block of k directions: A V, (P, k) -> (P, k).

        V must have the operator's dtype and device (TypeError / ValueError otherwise) and
        k >= 1 columns; it is detached (products are not differentiated through). The k
        columns go through one call of the product, not k calls of :meth:`matvec`.
        """
        self._check_block(V, "matmat")
        if V.dim() != 2 or V.shape[0] != self._dim or V.shape[1] == 0:
            raise ValueError(f"{type(self).__name__}.matmat: expected a block of shape "
                             f"({self._dim}, k) with k >= 1, got {tuple(V.shape)}")
        # directions are data: products are not differentiated through
        return self._matmat(V.detach())

    def matvec(self, v: Vector) -> Vector:
        """Applies the operator to one direction: A v for a flat (P,) vector, or for a list
        (or tuple) of tensors shaped like the parameters, in layout order (the result is
        then a list of the same shapes). Dtype and device as :meth:`matmat`."""
        if isinstance(v, (list, tuple)):
            return self._matvec_list(v)
        self._check_block(v, "matvec")
        if v.dim() != 1 or v.shape[0] != self._dim:
            raise ValueError(f"{type(self).__name__}.matvec: expected a vector of shape "
                             f"({self._dim},), got {tuple(v.shape)}")
        return self._matmat(v.detach().view(-1, 1)).view(-1)

    def _matvec_list(self, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(vs) != len(self.param_shapes):
            raise ValueError(f"{type(self).__name__}.matvec: expected {len(self.param_shapes)} "
                             f"tensors (one per parameter), got {len(vs)}")
        for i, (t, shape) in enumerate(zip(vs, self.param_shapes)):
            if not isinstance(t, torch.Tensor) or t.shape != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{type(self).__name__}.matvec: entry {i} must have shape "
                                 f"{tuple(shape)}, got {got}")
        return self.layout.split(self.matvec(self.layout.concatenate(vs)))

    def __matmul__(self, x: Vector) -> Vector:
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            return self.matmat(x)
        return self.matvec(x)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` of shape (P, P) over numpy arrays
        (float64 for a float64 operator, float32 otherwise); vectors (P,) and blocks (P, k)
        travel to the operator's device and back. ``rmatvec`` is ``matvec`` (A = A^T), so
        it serves ``scipy.sparse.linalg.eigsh``, ``cg``, ``minres`` and the like."""
        from scipy.sparse.linalg import LinearOperator

        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32

        def apply(x):
            x = np.asarray(x)
            block = torch.as_tensor(np.ascontiguousarray(x.reshape(self._dim, -1)),
                                    dtype=self.dtype, device=self.device)
            return self.matmat(block).cpu().numpy().reshape(x.shape).astype(np_dtype, copy=False)

        return LinearOperator(self.shape, matvec=apply, rmatvec=apply, matmat=apply,
                              rmatmat=apply, dtype=np_dtype)

    def to_dense(self, chunk: int = 256) -> torch.Tensor:
        """The dense (P, P) matrix in the operator's dtype and on its device, built from
        blocks of ``chunk`` unit vectors: P products in all, and P^2 entries of memory
        (small models only)."""
        dense = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        for start in range(0, self._dim, chunk):
            stop = min(start + chunk, self._dim)
            eye = torch.zeros(self._dim, stop - start, dtype=self.dtype, device=self.device)
            eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
            dense[:, start:stop] = self._matmat(eye)
        return dense

    def block_size(self) -> int | None:
        """The most directions one product call takes under the operator's memory policy,
        or None where it sets no bound (a wider block is then one call).

        It follows from static sizes alone (the model's widths, the batch, the dtype),
        never from the memory free at run time: a product's last bits may depend on the
        block a direction travels in, so the same call must split its blocks the same way
        on every run. The estimators send their probes in blocks of this size by default.
        """
        return None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, "
                f"device={self.device})")

    # ---- algebra ------------------------------------------------------------------------

    def __add__(self, other: CurvatureOperator) -> LinearCombination:
        return LinearCombination([(1.0, self), (1.0, other)])

    def __sub__(self, other: CurvatureOperator) -> LinearCombination:
        return LinearCombination([(1.0, self), (-1.0, other)])

    def __mul__(self, scalar: float) -> LinearCombination:
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
            return NotImplemented
        return LinearCombination([(float(scalar), self)])

    __rmul__ = __mul__

    def __neg__(self) -> LinearCombination:
        return LinearCombination([(-1.0, self)])

    def restrict(self, which: Sequence[int | torch.Tensor]) -> Restricted:
        """The operator on a subset of the parameters (one layer, one block): the
        principal submatrix A[S, S] for the parameters S, given by position in the
        flat layout or, where the operator knows its parameters, as the tensors.

        Returns a :class:`Restricted` operator of shape (P_S, P_S), P_S the number of
        entries of those parameters, over them in layout order.

        Example:
            >>> H = pyflat.Hessian(model, (X, y))
            >>> block = H.restrict([model[0].weight, model[0].bias])
            >>> pyflat.eigsh(block, k=1).eigenvalues
        """
        return Restricted(self, which)


class LinearCombination(CurvatureOperator):
    """sum_i c_i A_i of operators over the same parameters, e.g. ``Hessian - GGN``.

    The terms must share parameter shapes, dtype and device; nested combinations are
    flattened into one list of (c_i, A_i), ``terms``. A product costs one product of
    each A_i. The result of ``A + B``, ``A - B``, ``c * A`` and ``-A``.

    Args:
        terms: pairs (c_i, A_i) of a float coefficient and a pyflat operator.

    Example:
        >>> residual = pyflat.Hessian(model, data) - pyflat.GGN(model, data)
        >>> pyflat.eigsh(residual, k=3, which="BE")
    """

    def __init__(self, terms: Sequence[tuple[float, CurvatureOperator]]):
        flat: list[tuple[float, CurvatureOperator]] = []
        for coef, op in terms:
            if not isinstance(op, CurvatureOperator):
                raise TypeError("operator algebra takes pyflat operators, got "
                                f"{type(op).__name__}")
            if isinstance(op, LinearCombination):
                flat += [(coef * c, inner) for c, inner in op.terms]
            else:
                flat.append((coef, op))
        first = flat[0][1]
        for _, op in flat[1:]:
            if op.param_shapes != first.param_shapes:
                raise ValueError("operator algebra needs operators over the same parameters: "
                                 f"{type(first).__name__} has shape {first.shape}, "
                                 f"{type(op).__name__} has {op.shape} (parameter shapes differ)")
            if op.dtype != first.dtype or op.device != first.device:
                raise ValueError("operator algebra needs one dtype and device: "
                                 f"{first.dtype} on {first.device} and {op.dtype} on {op.device}")
        super().__init__(first.layout, first.dtype, first.device)
        self.terms = flat

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = None
        for coef, op in self.terms:
            part = op._matmat(V)
            out = part.mul(coef) if out is None else out.add_(part, alpha=coef)
        return out

    def block_size(self) -> int | None:
        """The smallest bound of the terms (each product runs every term on the block)."""
        sizes = [size for _, op in self.terms if (size := op.block_size()) is not None]
        return min(sizes) if sizes else None

    def __repr__(self) -> str:
        inner = " + ".join(f"{c:g} * {type(op).__name__}" for c, op in self.terms)
        return f"LinearCombination({inner}, shape={self.shape})"


class Restricted(CurvatureOperator):
    """The principal submatrix A[S, S] of an operator for a subset S of its parameters.

    A[S, S] = E_S^T A E_S, with E_S (P, P_S) the columns of the identity at the entries of
    S. A product embeds V (P_S, k) into the full space (zeros elsewhere), applies A once
    and keeps the rows of S, so it costs one full product.

    Args:
        operator: the full operator A.
        which: the parameters S, by position in the layout (ints) or as the tensors
            (where the operator knows its parameters); one of them alone is allowed too.
            Kept in layout order (``positions``).
    """

    def __init__(self, operator: CurvatureOperator, which: Sequence[int | torch.Tensor]):
        if isinstance(which, (torch.Tensor, int)):  # one parameter, not a list of them
            which = [which]
        which = list(which)
        if not which:
            raise ValueError("restrict: which must name at least one parameter, got none")
        positions = []
        for item in which:
            if isinstance(item, torch.Tensor):
                if operator.parameters is None:
                    raise TypeError(f"restrict: {type(operator).__name__} does not know its "
                                    "parameters; give positions in the flat layout")
                position = operator.layout.position(item)
                if position is None:
                    raise ValueError(f"restrict: a tensor of shape {tuple(item.shape)} is not "
                                     "one of the operator's parameters")
                positions.append(position)
            elif isinstance(item, bool) or not isinstance(item, int):
                raise TypeError(f"restrict: which holds parameter positions (ints) or the "
                                f"parameter tensors, got {type(item).__name__} {item!r}")
            elif 0 <= item < len(operator.param_shapes):
                positions.append(item)
            else:
                raise ValueError(f"restrict: parameters are given by position in [0, "
                                 f"{len(operator.param_shapes)}) or as tensors, got {item!r}")
        if len(set(positions)) != len(positions):
            raise ValueError(f"restrict: a parameter is named twice (positions {positions})")
        positions.sort()
        super().__init__(operator.layout.select(positions), operator.dtype, operator.device)
        self.operator = operator
        self.positions = positions
        self._rows = operator.layout.indices(positions).to(operator.device)

    def block_size(self) -> int | None:
        """The full operator's bound: a product runs it on the embedded block."""
        return self.operator.block_size()

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        full = V.new_zeros(self.operator.shape[0], V.shape[1])
        full[self._rows] = V
        return self.operator._matmat(full)[self._rows]


def operator_block_size(A) -> int | None:
    """The operator's bound on directions per product call (``A.block_size()``), or None
    for a dense tensor or an operator without one."""
    bound = getattr(A, "block_size", None)
    return bound() if callable(bound) else None
