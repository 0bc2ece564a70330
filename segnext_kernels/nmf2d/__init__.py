"""NMF2D (Hamburger matrix decomposition): reference, fused op, module."""
from .functional import nmf2d
from .module import NMF2D
from .reference import draw_bases, nmf_decompose_ref

__all__ = ["nmf2d", "NMF2D", "draw_bases", "nmf_decompose_ref"]
