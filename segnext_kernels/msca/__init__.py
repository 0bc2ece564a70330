"""Multi-scale convolutional attention (MSCA): reference, fused op, module."""
from .functional import msca
from .module import MSCA
from .reference import MSCAWeights, msca_ref, weight_shapes

__all__ = ["msca", "MSCA", "msca_ref", "MSCAWeights", "weight_shapes"]
