"""LightHamHead: SegNeXt's decoder (docs/model.md#lighthamhead), with the official module names.

Stages 2-4 are resized to the stride-8 size, concatenated, squeezed by a 1x1 conv, passed
through the Hamburger (1x1 conv, ReLU, NMF2D, 1x1 conv, residual), aligned by a 1x1 conv and
classified. The NMF runs ``segnext_kernels.NMF2D``, fused on the selected backend.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segnext_kernels import NMF2D, conv1x1

from ._fold import cached, fused_inference

from ._validate import check_int, check_ints, check_probability

GN_GROUPS = 32


class ConvModule(nn.Module):
    """mmcv's ConvModule for a 1x1 conv: ``conv`` then optional ``gn`` (GroupNorm 32) and ReLU.

    As mmcv's ``bias='auto'``: the conv has a bias only when no norm follows it. Init: Kaiming
    normal (fan_out, relu) for the conv, 1 and 0 for the norm.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: bool = True, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=not norm)
        self.gn = nn.GroupNorm(GN_GROUPS, out_channels) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)
        if self.gn is not None:
            nn.init.ones_(self.gn.weight)
            nn.init.zeros_(self.gn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_inference(self, x):  # the fused 1x1 conv (with the ReLU when no norm follows)
            fuse_act = self.gn is None and self.activate is not None
            x = conv1x1(x, self.conv.weight, self.conv.bias, act="relu" if fuse_act else "none")
            if fuse_act:
                return x
        else:
            x = self.conv(x)
        if self.gn is not None:
            x = self.gn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


class Hamburger(nn.Module):
    """x -> ReLU(x + ham_out(NMF(ReLU(ham_in(x))))) (docs/model.md#hamburger).

    ``ham_in`` has a bias and no norm; ``ham_out`` has GN and no bias; ``ham`` has no state.
    """

    def __init__(self, channels: int, **nmf_kwargs):
        super().__init__()
        self.ham_in = ConvModule(channels, channels, norm=False, act=False)
        self.ham = NMF2D(**nmf_kwargs)
        self.ham_out = ConvModule(channels, channels, norm=True, act=False)

    def forward(self, x: torch.Tensor, bases: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if fused_inference(self, x):  # ham_in's conv and the ReLU in one pass
            conv = self.ham_in.conv
            enjoy = conv1x1(x, conv.weight, conv.bias, act="relu")
        else:
            enjoy = F.relu(self.ham_in(x), inplace=True)  # NMF needs a non-negative input
        enjoy = self.ham_out(self.ham(enjoy, bases=bases, generator=generator))
        return F.relu(x + enjoy, inplace=True)


class LightHamHead(nn.Module):
    """The decode head: takes the backbone's stage list, returns logits at the stride of
    ``in_index[0]`` (stride 8).

    ``nmf_kwargs`` are ``segnext_kernels.NMF2D`` arguments (``R``, ``train_steps``,
    ``eval_steps``, ``grad``...). The official NMF always runs with inv_t 1, whatever the config
    says, which is NMF2D's default.
    """

    def __init__(self, in_channels: Sequence[int] = (64, 160, 256),
                 in_index: Sequence[int] = (1, 2, 3), channels: int = 256,
                 ham_channels: int = 256, num_classes: int = 150, dropout_ratio: float = 0.1,
                 align_corners: bool = False, nmf_kwargs: Optional[dict] = None):
        super().__init__()
        check_ints("in_channels", in_channels, 1)
        check_ints("in_index", in_index, 0)
        check_int("channels", channels, 1)
        check_int("ham_channels", ham_channels, 1)
        check_int("num_classes", num_classes, 1)
        check_probability("dropout_ratio", dropout_ratio)
        if len(in_channels) != len(in_index):
            raise ValueError(f"in_channels {tuple(in_channels)} and in_index {tuple(in_index)} "
                             "must have the same length")
        self.in_channels = tuple(in_channels)
        self.in_index = tuple(in_index)
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.squeeze = ConvModule(sum(in_channels), ham_channels)
        self.hamburger = Hamburger(ham_channels, **(nmf_kwargs or {}))
        self.align = ConvModule(ham_channels, channels)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """``conv_seg``: Normal(0, 0.01), bias 0 (BaseDecodeHead); ConvModules init themselves."""
        nn.init.normal_(self.conv_seg.weight, 0.0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats: Sequence[torch.Tensor], bases: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``bases`` / ``generator`` go to the NMF: fixed (B, C, R) bases or a seeded generator
        on the input's device make the output reproducible (the bases are otherwise drawn at
        random on every call)."""
        if len(feats) <= max(self.in_index):
            raise ValueError(f"feats must hold the backbone's stage outputs, at least "
                             f"{max(self.in_index) + 1} (in_index {self.in_index}), got "
                             f"{len(feats)}")
        inputs = [feats[i] for i in self.in_index]
        if fused_inference(self, inputs[0]):
            x = self._squeeze_fused(inputs)
        else:
            size = inputs[0].shape[2:]
            inputs = [self._resize(x, size) for x in inputs]
            x = self.squeeze(torch.cat(inputs, dim=1))
        x = self.hamburger(x, bases=bases, generator=generator)
        x = self.align(x)
        x = self.dropout(x)
        if fused_inference(self, x):
            return conv1x1(x, self.conv_seg.weight, self.conv_seg.bias)
        return self.conv_seg(x)

    def _resize(self, x: torch.Tensor, size) -> torch.Tensor:
        if x.shape[2:] == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    # Inference: the squeeze conv of the concatenated, resized stages is the sum of its slices'
    # convs of each stage, and a 1x1 conv commutes with the bilinear resize (a per-channel
    # convex combination of pixels): each slice runs at its stage's own resolution (4x and
    # 16x fewer pixels for stages 3 and 4), and the resized maps are never concatenated.
    def _squeeze_fused(self, inputs) -> torch.Tensor:
        conv = self.squeeze.conv
        splits = [x.shape[1] for x in inputs]

        def slices():
            return [w.contiguous(memory_format=torch.channels_last)
                    for w in torch.split(conv.weight, splits, dim=1)]
        weights = cached(self, "_squeeze_slices", [conv.weight], slices)
        size = inputs[0].shape[2:]
        rest = None
        for x, w in zip(inputs[1:], weights[1:]):
            y = self._resize(conv1x1(x, w), size)
            rest = y if rest is None else rest.add_(y)
        x = conv1x1(inputs[0], weights[0], conv.bias, residual=rest)
        if self.squeeze.gn is not None:
            x = self.squeeze.gn(x)
        return F.relu(x, inplace=True) if self.squeeze.activate is not None else x
