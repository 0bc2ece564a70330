"""Depthwise 3x3 conv + bias + GELU (the middle of the MSCAN MLP): reference and fused op."""
from .functional import dwconv_gelu
from .reference import dwconv_gelu_ref

__all__ = ["dwconv_gelu", "dwconv_gelu_ref"]
