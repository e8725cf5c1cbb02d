"""The error that says the fused engines cannot take a model."""
from __future__ import annotations


class UnsupportedModel(TypeError):
    """The fused engines cannot take this model: a module, function, hook, parameter use or
    input whose exact function they do not compute. It is the only error on which
    ``backend="auto"`` falls back to the autograd backend; any other error, a TypeError
    from a bug inside an engine included, propagates. A TypeError subclass, so code that
    caught TypeError keeps working.

    ``path`` is the module's path in ``model.named_modules()`` ("" for the model itself)
    or the graph node's label, where the refusal concerns one.
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(f"{message}; the fused engines cannot take this model")
        self.path = path
