"""dwconv_gelu reference: the specification, in plain PyTorch (autograd by PyTorch).

y = gelu(dw3x3(x) + b): the depthwise 3x3 conv ('same' zero padding, bias) and the exact erf
GELU that follow fc1 in every MSCAN block's MLP (docs/model.md#mlp).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import check_one_device


def dwconv_gelu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W), ``weight`` (C, 1, 3, 3), ``bias`` (C,)."""
    # PyTorch's conv2d returns garbage for a meta weight with real inputs: refuse mixed devices.
    check_one_device("dwconv_gelu_ref", [("x", x), ("weight", weight), ("bias", bias)])
    return F.gelu(F.conv2d(x, weight, bias, padding=1, groups=x.shape[1]))
