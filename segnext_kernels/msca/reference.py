"""MSCA reference: the specification, in plain PyTorch (autograd by PyTorch).

out = conv3(a + B7(a) + B11(a) + B21(a)) * u,  a = dw5x5(u),  Bk = dw(k x 1) o dw(1 x k)
(docs/model.md#msca). Every depthwise conv has a bias; conv3 is a dense 1x1 conv.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._validate import check_one_device

# (name, kernel (kh, kw)) of the 7 depthwise convs in the order of the official module.
DW_CONVS = (
    ("conv0", (5, 5)),
    ("conv0_1", (1, 7)), ("conv0_2", (7, 1)),
    ("conv1_1", (1, 11)), ("conv1_2", (11, 1)),
    ("conv2_1", (1, 21)), ("conv2_2", (21, 1)),
)
CONV_NAMES = tuple(n for n, _ in DW_CONVS) + ("conv3",)


class MSCAWeights(NamedTuple):
    """The 16 parameters of an MSCA, in the op's argument order."""
    w0: torch.Tensor
    b0: torch.Tensor
    w0_1: torch.Tensor
    b0_1: torch.Tensor
    w0_2: torch.Tensor
    b0_2: torch.Tensor
    w1_1: torch.Tensor
    b1_1: torch.Tensor
    w1_2: torch.Tensor
    b1_2: torch.Tensor
    w2_1: torch.Tensor
    b2_1: torch.Tensor
    w2_2: torch.Tensor
    b2_2: torch.Tensor
    w3: torch.Tensor
    b3: torch.Tensor


def weight_shapes(channels: int):
    """Official shapes of the 16 parameters, in MSCAWeights order."""
    shapes = []
    for _, (kh, kw) in DW_CONVS:
        shapes += [(channels, 1, kh, kw), (channels,)]
    shapes += [(channels, channels, 1, 1), (channels,)]
    return shapes


def _dw(x, w, b):
    kh, kw = w.shape[-2:]
    return F.conv2d(x, w, b, padding=(kh // 2, kw // 2), groups=x.shape[1])


def msca_ref(u: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """Reference MSCA. ``weights`` are the 16 tensors in MSCAWeights order."""
    w = MSCAWeights(*weights)
    # PyTorch's conv2d returns garbage for a meta weight with real inputs: refuse mixed devices.
    check_one_device("msca_ref", [("u", u), *zip(MSCAWeights._fields, w)])
    a = _dw(u, w.w0, w.b0)
    s = a
    s = s + _dw(_dw(a, w.w0_1, w.b0_1), w.w0_2, w.b0_2)
    s = s + _dw(_dw(a, w.w1_1, w.b1_1), w.w1_2, w.b1_2)
    s = s + _dw(_dw(a, w.w2_1, w.b2_1), w.w2_2, w.b2_2)
    return F.conv2d(s, w.w3, w.b3) * u
