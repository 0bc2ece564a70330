"""SegNeXt as the official code writes it (Visual-Attention-Network/SegNeXt ``mscan.py`` and
``ham_head.py``, mmseg 0.24 style), restated without mmcv and independently of ``segnext``:
tokens between stages with a LayerNorm, ``AttentionModule`` with ``u = x.clone()``, ``Mlp``
with the ``DWConv`` wrapper, BN pre-norm blocks with layer scales, ``LightHamHead`` with
ConvModule-shaped children (``conv``/``gn``) and an mmseg-1.x-style ``NMF2D`` (bases drawn on the
input's device). Its ``state_dict`` keys are the official checkpoint keys.

It is the "training code written for the official SegNeXt" of the drop-in claim: the tests
check that patching keeps its outputs and its training steps (tests/test_patch.py) and that the
NMF reference is its algorithm (tests/test_nmf2d_reference.py); the ``patch`` benchmark level
(bench/bench_patch.py, which loads this file by its path) times it as is and after
``segnext_kernels.patch(model)``.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SIZES = {  # embed_dims, depths, head channels, NMF rank (original repo: 64 for B/L)
    "t": ((32, 64, 160, 256), (3, 3, 5, 2), 256, 16),
    "s": ((64, 128, 320, 512), (2, 2, 4, 2), 256, 16),
    "b": ((64, 128, 320, 512), (3, 3, 12, 3), 512, 64),
    "l": ((64, 128, 320, 512), (3, 5, 27, 3), 1024, 64),
}
MLP_RATIOS = (8, 8, 4, 4)


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class DWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x):
        return self.dwconv(x)


class Mlp(nn.Module):
    """``plain_dwconv`` spells the 3x3 as mmseg 1.x does (keys ``dwconv.*``, no wrapper)."""

    def __init__(self, in_features, hidden_features, drop=0.0, plain_dwconv=False):
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.dwconv = (nn.Conv2d(hidden_features, hidden_features, 3, 1, 1, bias=True,
                                 groups=hidden_features)
                       if plain_dwconv else DWConv(hidden_features))
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_features, in_features, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.dwconv(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


class StemConv(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, out_channels // 2, 3, 2, 1),
            nn.BatchNorm2d(out_channels // 2),
            nn.GELU(),
            nn.Conv2d(out_channels // 2, out_channels, 3, 2, 1),
            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        x = self.proj(x)
        _, _, H, W = x.size()
        return x.flatten(2).transpose(1, 2), H, W


class AttentionModule(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv0_1 = nn.Conv2d(dim, dim, (1, 7), padding=(0, 3), groups=dim)
        self.conv0_2 = nn.Conv2d(dim, dim, (7, 1), padding=(3, 0), groups=dim)
        self.conv1_1 = nn.Conv2d(dim, dim, (1, 11), padding=(0, 5), groups=dim)
        self.conv1_2 = nn.Conv2d(dim, dim, (11, 1), padding=(5, 0), groups=dim)
        self.conv2_1 = nn.Conv2d(dim, dim, (1, 21), padding=(0, 10), groups=dim)
        self.conv2_2 = nn.Conv2d(dim, dim, (21, 1), padding=(10, 0), groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        u = x.clone()
        attn = self.conv0(x)
        attn_0 = self.conv0_2(self.conv0_1(attn))
        attn_1 = self.conv1_2(self.conv1_1(attn))
        attn_2 = self.conv2_2(self.conv2_1(attn))
        attn = attn + attn_0 + attn_1 + attn_2
        attn = self.conv3(attn)
        return attn * u


class SpatialAttention(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.proj_1 = nn.Conv2d(d_model, d_model, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = AttentionModule(d_model)
        self.proj_2 = nn.Conv2d(d_model, d_model, 1)

    def forward(self, x):
        shortcut = x.clone()
        x = self.proj_1(x)
        x = self.activation(x)
        x = self.spatial_gating_unit(x)
        x = self.proj_2(x)
        return x + shortcut


class Block(nn.Module):
    def __init__(self, dim, mlp_ratio, drop_path):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = SpatialAttention(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(1e-2 * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(1e-2 * torch.ones(dim))

    def forward(self, x, H, W):
        B, N, C = x.shape
        x = x.permute(0, 2, 1).view(B, C, H, W)
        x = x + self.drop_path(self.layer_scale_1.unsqueeze(-1).unsqueeze(-1)
                               * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.layer_scale_2.unsqueeze(-1).unsqueeze(-1)
                               * self.mlp(self.norm2(x)))
        return x.view(B, C, N).permute(0, 2, 1)


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x):
        x = self.norm(self.proj(x))
        _, _, H, W = x.shape
        return x.flatten(2).transpose(1, 2), H, W


class MSCAN(nn.Module):
    def __init__(self, embed_dims: Sequence[int], depths: Sequence[int],
                 drop_path_rate: float = 0.1):
        super().__init__()
        self.depths = depths
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        cur = 0
        for i in range(4):
            embed = StemConv(3, embed_dims[0]) if i == 0 else \
                OverlapPatchEmbed(embed_dims[i - 1], embed_dims[i])
            block = nn.ModuleList([Block(embed_dims[i], MLP_RATIOS[i], dpr[cur + j])
                                   for j in range(depths[i])])
            cur += depths[i]
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", block)
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i]))

    def forward(self, x):
        B = x.shape[0]
        outs = []
        for i in range(4):
            x, H, W = getattr(self, f"patch_embed{i + 1}")(x)
            for blk in getattr(self, f"block{i + 1}"):
                x = blk(x, H, W)
            x = getattr(self, f"norm{i + 1}")(x)
            x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


class ConvModule(nn.Module):
    """mmcv ConvModule as LightHamHead builds it: conv, optional GN(32), optional ReLU."""

    def __init__(self, cin, cout, norm: bool, act: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=not norm)
        if norm:
            self.gn = nn.GroupNorm(32, cout)
        self.norm, self.act = norm, act

    def forward(self, x):
        x = self.conv(x)
        if self.norm:
            x = self.gn(x)
        return F.relu(x, inplace=True) if self.act else x


class NMF2D(nn.Module):
    """mmseg 1.x ``NMF2D`` (``_MatrixDecomposition2DBase`` + ``NMF2D``), rand_init, S = 1."""

    def __init__(self, S=1, R=64, train_steps=6, eval_steps=7, inv_t=100, rand_init=True):
        super().__init__()
        self.S, self.R = S, R
        self.train_steps, self.eval_steps = train_steps, eval_steps
        self.inv_t = 1  # NMF2D overrides it
        self.rand_init = rand_init

    def _build_bases(self, B, S, D, R, device):
        bases = torch.rand((B * S, D, R), device=device)
        return F.normalize(bases, dim=1)

    def local_step(self, x, bases, coef):
        numerator = torch.bmm(x.transpose(1, 2), bases)
        denominator = coef.bmm(bases.transpose(1, 2).bmm(bases))
        coef = coef * numerator / (denominator + 1e-6)
        numerator = torch.bmm(x, coef)
        denominator = bases.bmm(coef.transpose(1, 2).bmm(coef))
        bases = bases * numerator / (denominator + 1e-6)
        return bases, coef

    def compute_coef(self, x, bases, coef):
        numerator = torch.bmm(x.transpose(1, 2), bases)
        denominator = coef.bmm(bases.transpose(1, 2).bmm(bases))
        return coef * numerator / (denominator + 1e-6)

    def forward(self, x):
        B, C, H, W = x.shape
        D = C // self.S
        N = H * W
        x = x.view(B * self.S, D, N)
        bases = self._build_bases(B, self.S, D, self.R, device=x.device)
        coef = F.softmax(self.inv_t * torch.bmm(x.transpose(1, 2), bases), dim=-1)
        steps = self.train_steps if self.training else self.eval_steps
        for _ in range(steps):
            bases, coef = self.local_step(x, bases, coef)
        coef = self.compute_coef(x, bases, coef)
        x = torch.bmm(bases, coef.transpose(1, 2))
        return x.view(B, C, H, W)


class Hamburger(nn.Module):
    def __init__(self, ham_channels, R):
        super().__init__()
        self.ham_in = ConvModule(ham_channels, ham_channels, norm=False, act=False)
        self.ham = NMF2D(R=R)
        self.ham_out = ConvModule(ham_channels, ham_channels, norm=True, act=False)

    def forward(self, x):
        enjoy = F.relu(self.ham_in(x), inplace=True)
        enjoy = self.ham(enjoy)
        enjoy = self.ham_out(enjoy)
        return F.relu(x + enjoy, inplace=True)


class LightHamHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], channels: int, R: int, num_classes: int):
        super().__init__()
        self.squeeze = ConvModule(sum(in_channels), channels, norm=True, act=True)
        self.hamburger = Hamburger(channels, R)
        self.align = ConvModule(channels, channels, norm=True, act=True)
        self.dropout = nn.Dropout2d(0.1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, inputs: List[torch.Tensor]):
        inputs = inputs[1:]
        size = inputs[0].shape[2:]
        inputs = [F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                  for x in inputs]
        x = self.squeeze(torch.cat(inputs, dim=1))
        x = self.align(self.hamburger(x))
        return self.conv_seg(self.dropout(x))


class OfficialSegNeXt(nn.Module):
    """backbone + decode_head, as mmseg's EncoderDecoder names them; returns stride-8 logits."""

    def __init__(self, size: str = "t", num_classes: int = 150):
        super().__init__()
        dims, depths, channels, R = SIZES[size]
        self.backbone = MSCAN(dims, depths, drop_path_rate=0.3 if size == "l" else 0.1)
        self.decode_head = LightHamHead(dims[1:], channels, R, num_classes)
        for m in self.modules():  # the official Conv2d init (fan_out normal)
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.decode_head(self.backbone(x))
