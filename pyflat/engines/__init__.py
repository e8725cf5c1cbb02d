"""The fused engines: the MLP engine (one op per product for chains of Linear layers) and
the graph engine (convnets and residual networks captured with torch.fx, one rule per
layer kind). They compute products for a model and batch the front door has checked."""
