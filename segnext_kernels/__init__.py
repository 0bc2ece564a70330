"""segnext-kernels: fused MSCA and NMF2D kernels for SegNeXt.

Public API: ``msca``/``MSCA``, ``nmf2d``/``NMF2D``, ``dwconv_gelu``, ``mlp``, ``conv1x1``, the references
(``msca_ref``, ``nmf_decompose_ref``), backend selection (``available_backends``,
``use_backend``, ``set_backend``, ``get_backend``, ``op_backends``) and ``record_kernels`` (which
kernels ran).
"""
from . import _extension
from . import kernels  # noqa: F401  (the kernel table dispatch reads)
from .conv1x1 import conv1x1, conv1x1_ref
from .backends import available_backends, get_backend, set_backend, use_backend
from .dispatch import op_backends, record_kernels
from .dwconv_gelu import dwconv_gelu, dwconv_gelu_ref
from .mlp import FusedMlp, mlp, mlp_ref
from .msca import MSCA, MSCAWeights, msca, msca_ref
from .nmf2d import NMF2D, draw_bases, nmf2d, nmf_decompose_ref
from .patch import patch, unpatch
from . import ops  # noqa: F401  (registers the torch.library ops)

__version__ = "0.1.0"

_extension.warn_once()

__all__ = [
    "MSCA", "MSCAWeights", "msca", "msca_ref",
    "NMF2D", "nmf2d", "nmf_decompose_ref", "draw_bases",
    "dwconv_gelu", "dwconv_gelu_ref",
    "mlp", "mlp_ref", "FusedMlp", "conv1x1", "conv1x1_ref", "patch", "unpatch",
    "available_backends", "use_backend", "set_backend", "get_backend", "op_backends",
    "record_kernels",
    "__version__",
]
