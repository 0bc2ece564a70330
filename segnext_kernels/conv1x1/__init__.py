"""A 1x1 convolution with its epilogue (activation, scaled residual): reference and fused op."""
from .functional import ACTIVATIONS, conv1x1
from .reference import conv1x1_ref

__all__ = ["conv1x1", "conv1x1_ref", "ACTIVATIONS"]
