"""The MSCAN MLP, fc2(gelu(dw3x3(fc1(x)))): reference and fused op."""
from .functional import mlp
from .module import FusedMlp
from .reference import mlp_ref

__all__ = ["mlp", "mlp_ref", "FusedMlp"]
