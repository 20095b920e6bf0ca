"""The one Transformer, its shape and FLOPs formulas, and vocabulary surgery."""
