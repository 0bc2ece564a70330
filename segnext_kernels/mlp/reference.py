"""MLP reference: the specification, in plain PyTorch (autograd by PyTorch).

y = fc2(gelu(dw3x3(fc1(x)))): the feed-forward part of every MSCAN block (docs/model.md#mlp) without its dropouts; fc1 (C -> hidden) and fc2 (hidden -> C) are 1x1 convs
with bias, dw3x3 a depthwise 3x3 conv with bias, GELU the exact (erf) one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validate import check_one_device
from ..dwconv_gelu.reference import dwconv_gelu_ref


def mlp_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, wd: torch.Tensor,
            bd: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W); ``w1`` (hidden, C, 1, 1), ``wd`` (hidden, 1, 3, 3), ``w2`` (C, hidden, 1, 1)."""
    # PyTorch's conv2d returns garbage for a meta weight with real inputs: refuse mixed devices.
    check_one_device("mlp_ref", [("x", x), ("w1", w1), ("b1", b1), ("wd", wd), ("bd", bd),
                                 ("w2", w2), ("b2", b2)])
    return F.conv2d(dwconv_gelu_ref(F.conv2d(x, w1, b1), wd, bd), w2, b2)
