"""Depthwise strip convolution (1×k or k×1, 'same' padding, with bias): reference and _C op.

Private: the model never calls it (MSCA fuses its strips). It is kept as the kernel of the
benchmark's ``strip`` level, which measures one strip conv against oneDNN's depthwise conv, the
unit every MSCA kernel is built from.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validate import check_one_device, check_same, check_tensor, memory_format_of
from .dispatch import Problem, layout_of, needs_grad, ran, select


def strip_conv_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    # PyTorch's conv2d returns garbage for a meta weight with real inputs: refuse mixed devices.
    check_one_device("strip_conv_ref", [("x", x), ("weight", weight)]
                     + ([] if bias is None else [("bias", bias)]))
    kh, kw = weight.shape[-2:]
    return F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=x.shape[1])


def strip_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
               backend: str | None = None) -> Tensor:
    """Depthwise 1×k / k×1 convolution of ``x`` (B, C, H, W) with ``weight`` (C, 1, kh, kw),
    odd k, zero padding k//2 (output the size of the input). Forward only in ``_C``."""
    check_tensor("x", x, dim=4)
    check_tensor("weight", weight, dim=4)
    C = x.shape[1]
    kh, kw = weight.shape[-2:]
    if weight.shape[:2] != (C, 1) or min(kh, kw) != 1 or max(kh, kw) % 2 == 0:
        raise ValueError(f"weight must have shape (C, 1, 1, k) or (C, 1, k, 1) with C={C} and odd k, "
                         f"got {tuple(weight.shape)}")
    named = [("weight", weight)]
    if bias is not None:
        check_tensor("bias", bias, dim=1)
        if bias.shape[0] != C:
            raise ValueError(f"bias must have shape ({C},), got {tuple(bias.shape)}")
        named.append(("bias", bias))
    check_same("x", x, named)
    name = select(Problem("strip_conv", x.device, x.dtype, layout_of(x), tuple(x.shape),
                          needs_grad(x, weight, bias), (("k", max(kh, kw)),)), backend)
    if name == "reference":
        ran("strip_conv", "reference")
        return strip_conv_ref(x, weight, bias)
    ran("strip_conv", name)
    x = x.contiguous(memory_format=memory_format_of(x))
    return torch.ops.segnext_C.strip_conv_forward(x, weight.contiguous(),
                                                  None if bias is None else bias.contiguous())
