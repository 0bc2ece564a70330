"""``MSCA``: drop-in for the official AttentionModule / MSCAAttention (same parameter names)."""
from __future__ import annotations

import numbers

import torch
from torch import nn

from .functional import msca
from .reference import DW_CONVS


class MSCA(nn.Module):
    """Multi-scale convolutional attention with the official parameter names and shapes.

    ``conv0`` (5x5), ``conv0_1``/``conv0_2`` (1x7, 7x1), ``conv1_1``/``conv1_2`` (1x11, 11x1),
    ``conv2_1``/``conv2_2`` (1x21, 21x1), all depthwise with bias, and ``conv3`` (dense 1x1),
    so an official state_dict loads unchanged. The forward runs the fused op of the selected
    backend (see ``segnext_kernels.use_backend``).
    """

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        channels = int(channels)
        self.channels = channels
        kw = dict(device=device, dtype=dtype)
        for name, (kh, kw_) in DW_CONVS:
            setattr(self, name, nn.Conv2d(channels, channels, (kh, kw_), padding=(kh // 2, kw_ // 2),
                                          groups=channels, **kw))
        self.conv3 = nn.Conv2d(channels, channels, 1, **kw)

    def weights(self):
        out = []
        for name, _ in DW_CONVS + (("conv3", None),):
            conv = getattr(self, name)
            out += [conv.weight, conv.bias]
        return out

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return msca(u, *self.weights())

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
