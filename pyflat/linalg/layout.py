"""The flat parameter layout: one object for every place that needs it.

A direction of an operator is ``torch.cat([p.reshape(-1) for p in model.parameters()])``:
P entries, the parameters in ``model.parameters()`` order (each tensor once, tied ones
included once). :class:`ParameterLayout` holds the names, shapes and offsets of that
layout and does the splitting and concatenating; operators, engines, the reference
backend, restriction and the reports take it from here, and the MLP op receives
directions in it (its weights and biases in this order).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ParameterLayout"]


class ParameterLayout:
    """Names, shapes and offsets of the flat parameter vector.

    Parameter i occupies entries ``offsets[i]:offsets[i + 1]`` of a flat (P,) direction,
    its ``numels[i]`` entries in row-major order; P = ``size`` = ``offsets[-1]``.

    Args:
        shapes: the parameters' shapes, in layout order.
        names: their names (``model.named_parameters()``), or positions as strings.
        parameters: the tensors themselves, where known (for lookups by identity).

    Example:
        >>> layout = ParameterLayout.of(nn.Linear(3, 2))
        >>> layout.names, layout.size
        (['weight', 'bias'], 8)
    """

    def __init__(self, shapes: Sequence[torch.Size], names: Sequence[str] | None = None,
                 parameters: Sequence[torch.Tensor] | None = None):
        self.shapes = [torch.Size(s) for s in shapes]
        self.names = list(names) if names is not None else [str(i) for i in range(len(shapes))]
        self.parameters = list(parameters) if parameters is not None else None
        if len(self.names) != len(self.shapes) or (
                self.parameters is not None and len(self.parameters) != len(self.shapes)):
            raise ValueError("ParameterLayout: shapes, names and parameters must have the same "
                             f"length, got {len(self.shapes)}, {len(self.names)} and "
                             f"{len(self.parameters) if self.parameters is not None else '-'}")
        self.numels = [s.numel() for s in self.shapes]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self._position = ({id(p): i for i, p in enumerate(self.parameters)}
                          if self.parameters is not None else {})

    @classmethod
    def of(cls, model: nn.Module) -> ParameterLayout:
        """The layout of ``model.parameters()``."""
        named = list(model.named_parameters())
        return cls([p.shape for _, p in named], [n for n, _ in named], [p for _, p in named])

    @property
    def size(self) -> int:
        """P, the length of a flat direction."""
        return self.offsets[-1]

    def __len__(self) -> int:
        return len(self.shapes)

    def position(self, parameter: torch.Tensor) -> int | None:
        """Where ``parameter`` (by identity) sits in the layout; None if it is not there."""
        return self._position.get(id(parameter))

    def span(self, i: int) -> slice:
        """The entries of parameter ``i`` in a flat direction."""
        return slice(self.offsets[i], self.offsets[i + 1])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A (P,) vector as views shaped like the parameters."""
        return [flat[self.span(i)].view(s) for i, s in enumerate(self.shapes)]

    def concatenate(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Tensors shaped like the parameters (or of as many entries) as one (P,) vector."""
        return torch.cat([t.reshape(-1) for t in parts])

    def rows(self, directions: torch.Tensor, i: int) -> torch.Tensor:
        """Parameter ``i`` of a (k, P) block of directions (rows), as (k, *shape)."""
        return directions[:, self.span(i)].reshape(directions.shape[0], *self.shapes[i])

    def write_rows(self, out: torch.Tensor, i: int, values: torch.Tensor) -> None:
        """Sets parameter ``i`` of a (k, P) block to ``values`` ((k, *shape) or (k, n))."""
        out[:, self.span(i)] = values.reshape(out.shape[0], -1)

    def indices(self, positions: Sequence[int]) -> torch.Tensor:
        """The flat entries of the parameters at ``positions``, in that order."""
        return torch.cat([torch.arange(self.offsets[i], self.offsets[i + 1]) for i in positions])

    def select(self, positions: Sequence[int]) -> ParameterLayout:
        """The layout of the parameters at ``positions``, in that order."""
        return ParameterLayout([self.shapes[i] for i in positions],
                               [self.names[i] for i in positions],
                               None if self.parameters is None else
                               [self.parameters[i] for i in positions])
