"""``dwconv_gelu(x, weight, bias)``: validate, pick the backend, run the fused op or the reference."""
from __future__ import annotations

import torch
from torch import Tensor

from .._validate import autocast_inputs, check_same, check_shape, check_tensor, memory_format_of
from ..dispatch import Problem, layout_of, needs_grad, ran, select
from .reference import dwconv_gelu_ref


def dwconv_gelu(x: Tensor, weight: Tensor, bias: Tensor, *, backend: str | None = None) -> Tensor:
    """``gelu(conv2d(x, weight, bias, padding=1, groups=C))``, fused.

    ``x``: (B, C, H, W), float32/float16/bfloat16/float64, contiguous or channels_last (the
    fast layout); ``weight`` (C, 1, 3, 3) and ``bias`` (C,). GELU is the exact (erf) one.
    Returns a tensor of ``x``'s dtype and memory format. ``backend`` overrides the selected
    one for this call (same rules as ``use_backend``).
    """
    check_tensor("x", x, dim=4)
    check_tensor("weight", weight)
    check_tensor("bias", bias)
    C = x.shape[1]
    check_shape("weight", weight, (C, 1, 3, 3))
    check_shape("bias", bias, (C,))
    x, (weight, bias) = autocast_inputs(x, [weight, bias])
    check_same("x", x, [("weight", weight), ("bias", bias)])
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    name = select(Problem("dwconv_gelu", x.device, x.dtype, layout_of(x), tuple(x.shape),
                          needs_grad(x, weight, bias)), backend)
    if name == "reference":
        ran("dwconv_gelu", "reference")
        return dwconv_gelu_ref(x, weight, bias)
    from ..ops import dwconv_gelu_fused
    x = x.contiguous(memory_format=memory_format_of(x))
    return dwconv_gelu_fused(x, weight.contiguous(), bias.contiguous(), name)
