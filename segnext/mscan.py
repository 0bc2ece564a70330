"""MSCAN: the SegNeXt encoder (docs/model.md#mscan-backbone), with the official module names.

Four stages; stage i is ``patch_embed{i}`` (a stride-2 conv embed; the stride-4 ``StemConv`` for
stage 1), ``block{i}`` (a ModuleList of ``Block``) and ``norm{i}`` (an ``nn.LayerNorm`` over
channels). The multi-scale attention of every block is ``segnext_kernels.MSCA``, so it runs the
fused kernels of the selected backend. The MLP's depthwise conv sits in a ``DWConv`` wrapper, so
the keys are ``mlp.dwconv.dwconv.*`` as in the original release; ``segnext.load_checkpoint``
also accepts mmseg's ``mlp.dwconv.*``.

Unlike the official code, maps stay in (B, C, H, W) between blocks; only the stage-end LayerNorm
works on channels-last values. The arithmetic is the same.

``drop_path`` is ours, not torchvision's ``stochastic_depth`` (torchvision is not a dependency):
it draws the mask as the official code does (floor(keep + rand)), so a seeded run drops alike.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segnext_kernels import MSCA, conv1x1, mlp
from segnext_kernels.dispatch import Problem, layout_of, select
from segnext_kernels.mlp.module import depthwise_conv, mlp_forward

from ._fold import (autocast_dtype, bn_affine, cached, fold_bn_into_conv, fused_inference,
                    has_running_stats, sources_of, wide)
from ._validate import check_image_batch, check_int, check_ints, check_probability, check_real

NormLayer = Callable[[int], nn.Module]

# docs/model.md#sizes: embed_dims, depths and drop_path_rate per size; mlp_ratios is [8, 8, 4, 4] for all.
MSCAN_SETTINGS: Dict[str, dict] = {
    "t": dict(embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2), drop_path_rate=0.1),
    "s": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2), drop_path_rate=0.1),
    "b": dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3), drop_path_rate=0.1),
    "l": dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 27, 3), drop_path_rate=0.3),
}
MLP_RATIOS = (8, 8, 4, 4)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth (mmcv's): zero whole samples, rescale the kept ones."""
    if drop_prob == 0.0 or not training:
        return x
    if drop_prob >= 1.0:  # every sample dropped (the formula would divide by zero: NaN)
        return x * 0.0
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    keep = (keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep_prob) * keep


class DropPath(nn.Module):
    """Stochastic depth of one residual branch, active in training only."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = check_probability("drop_prob", drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class StemConv(nn.Module):
    """Stage-1 embed (``patch_embed1``): two stride-2 3x3 convs with norms, GELU between (docs/model.md#stem)."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer: NormLayer):
        super().__init__()
        mid = out_channels // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, stride=2, padding=1),
            norm_layer(mid),
            nn.GELU(),
            nn.Conv2d(mid, out_channels, 3, stride=2, padding=1),
            norm_layer(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv1, norm1, act, conv2, norm2 = self.proj
        if fused_inference(self, x) and has_running_stats(norm1) and has_running_stats(norm2):
            (w1, b1), (w2, b2) = cached(self, "_folded_cache",
                                        sources_of(conv1, norm1, conv2, norm2),
                                        lambda: (fold_bn_into_conv(conv1, norm1),
                                                 fold_bn_into_conv(conv2, norm2)))
            x = act(F.conv2d(x, w1, b1, conv1.stride, conv1.padding))
            return F.conv2d(x, w2, b2, conv2.stride, conv2.padding)
        return self.proj(x)


class OverlapPatchEmbed(nn.Module):
    """Stage 2-4 embed: stride-2 3x3 conv then a norm, no activation (docs/model.md#stage-embeds)."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer: NormLayer,
                 patch_size: int = 3, stride: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, patch_size, stride=stride,
                              padding=patch_size // 2)
        self.norm = norm_layer(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_inference(self, x) and has_running_stats(self.norm):  # the norm in the conv
            w, b = cached(self, "_folded_cache", sources_of(self.proj, self.norm),
                          lambda: fold_bn_into_conv(self.proj, self.norm))
            return F.conv2d(x, w, b, self.proj.stride, self.proj.padding)
        return self.norm(self.proj(x))


class DWConv(nn.Module):
    """Depthwise 3x3 conv in its own module: keys ``dwconv.dwconv.*`` as the original release."""

    def __init__(self, channels: int):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x)


class Mlp(nn.Module):
    """fc1 (1x1) -> depthwise 3x3 -> GELU -> dropout -> fc2 (1x1) -> dropout (docs/model.md#mlp).

    Runs ``segnext_kernels.mlp`` with the selected backend: for inference the whole MLP is
    one fused op, in training fc1 -> fused dwconv+GELU -> fc2 (the reference backend runs the
    same convs and GELU unfused). Dropout (p > 0, training) keeps the module path.
    """

    _segnext_fused_mlp = True  # segnext_kernels.patch leaves it alone

    def __init__(self, channels: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp_forward(self, x)


class SpatialAttention(nn.Module):
    """proj_1 -> GELU -> MSCA -> proj_2, plus the sublayer's own shortcut (docs/model.md#attention-sublayer)."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj_1 = nn.Conv2d(channels, channels, 1)
        self.activation = nn.GELU()
        self.spatial_gating_unit = MSCA(channels)
        self.proj_2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x))))
        return y + x


class Block(nn.Module):
    """Pre-norm block: x += γ1·Attn(BN1 x); x += γ2·MLP(BN2 x), with stochastic depth (docs/model.md#block)."""

    def __init__(self, channels: int, mlp_ratio: float, norm_layer: NormLayer,
                 drop: float = 0.0, drop_path_rate: float = 0.0, layer_scale_init: float = 1e-2):
        super().__init__()
        self.norm1 = norm_layer(channels)
        self.attn = SpatialAttention(channels)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.norm2 = norm_layer(channels)
        self.mlp = Mlp(channels, int(channels * mlp_ratio), drop)
        self.layer_scale_1 = nn.Parameter(layer_scale_init * torch.ones(channels))
        self.layer_scale_2 = nn.Parameter(layer_scale_init * torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._folds(x):
            return self._forward_folded(x)
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        x = x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))
        return x

    # Inference with the fused kernels: the eval-mode norms (affine maps) fold into proj_1 and
    # fc1, the layer scales into proj_2 and fc2, and the attention shortcut into one
    # multiply-add, so each sublayer is its convs/kernels plus one elementwise pass instead of
    # four (norm, shortcut add, scale, residual add). The arithmetic is the block's; only the
    # rounding differs. The reference backend, training, and anything needing gradients run
    # the block as written.
    def _folds(self, x: torch.Tensor) -> bool:
        if self.training or torch.is_grad_enabled():
            return False
        if not all(isinstance(n, nn.modules.batchnorm._BatchNorm) and n.running_mean is not None
                   and n.running_var is not None for n in (self.norm1, self.norm2)):
            return False
        # Folding pays off with the fused MSCA (the block then has no other elementwise pass).
        return select(Problem("msca", x.device, x.dtype, layout_of(x), tuple(x.shape), False)) \
            != "reference"

    def _folded_weights(self):
        attn, mlp_ = self.attn, self.mlp
        sources = [attn.proj_1.weight, attn.proj_1.bias, attn.proj_2.weight, attn.proj_2.bias,
                   mlp_.fc1.weight, mlp_.fc1.bias, mlp_.fc2.weight, mlp_.fc2.bias,
                   self.layer_scale_1, self.layer_scale_2]
        for n in (self.norm1, self.norm2):
            sources += [t for t in (n.weight, n.bias, n.running_mean, n.running_var) if t is not None]
        return cached(self, "_folded_cache", sources, self._fold)

    def _fold(self):
        attn, mlp_ = self.attn, self.mlp
        (s1, t1), (s2, t2) = bn_affine(self.norm1), bn_affine(self.norm2)
        ls1, ls2 = wide(self.layer_scale_1), wide(self.layer_scale_2)
        p1, p2, f1, f2 = attn.proj_1, attn.proj_2, mlp_.fc1, mlp_.fc2
        W1, B1, W2, B2 = wide(p1.weight), wide(p1.bias), wide(p2.weight), wide(p2.bias)
        F1, G1, F2, G2 = wide(f1.weight), wide(f1.bias), wide(f2.weight), wide(f2.bias)
        # x + ls1 * (proj_2(m) + n1) = (1 + ls1 s1) x + ls1 (b2 + t1) + (ls1 W2) m
        folded = dict(
            p1w=W1 * s1[None, :, None, None], p1b=B1 + W1.flatten(1) @ t1,
            p2w=W2 * ls1[:, None, None, None], p2b=ls1 * (B2 + t1),
            a1=(1 + ls1 * s1)[None, :, None, None],
            f1w=F1 * s2[None, :, None, None], f1b=G1 + F1.flatten(1) @ t2,
            f2w=F2 * ls2[:, None, None, None], f2b=ls2 * G2)
        return {k: v.to(p1.weight.dtype) for k, v in folded.items()}

    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        w = self._folded_weights()
        dt = autocast_dtype(x)
        if dt is not None and w["p1w"].dtype != dt:  # cast once, not by the ops on every call
            w = cached(self, "_folded_autocast_cache", list(w.values()),
                       lambda: {k: v.to(dt) for k, v in w.items()}, extra=dt)
        attn = self.attn
        # The 1x1 convs with their elementwise pass fused (GELU; the shortcut, a1 x).
        act = attn.activation
        if isinstance(act, nn.GELU) and act.approximate == "none":
            u = conv1x1(x, w["p1w"], w["p1b"], act="gelu")
        else:
            u = act(F.conv2d(x, w["p1w"], w["p1b"]))
        x = conv1x1(attn.spatial_gating_unit(u), w["p2w"], w["p2b"], residual=x, scale=w["a1"])
        conv = depthwise_conv(self.mlp.dwconv)
        return mlp(x, w["f1w"], w["f1b"], conv.weight, conv.bias, w["f2w"], w["f2b"]).add_(x)


class MSCAN(nn.Module):
    """The MSCAN encoder; ``forward`` returns the four stage maps (strides 4, 8, 16, 32).

    ``norm_layer`` builds every BN-type norm from a channel count (``nn.BatchNorm2d`` by default,
    as mmseg's configs; pass ``nn.SyncBatchNorm`` for the original configs: same keys). The
    stage-end norms are always ``nn.LayerNorm``. Weights are initialised as MSCAN.init_weights
    does without a pretrained checkpoint (docs/model.md#weight-initialisation).
    """

    def __init__(self, in_channels: int = 3, embed_dims: Sequence[int] = (32, 64, 160, 256),
                 depths: Sequence[int] = (3, 3, 5, 2), mlp_ratios: Sequence[float] = MLP_RATIOS,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_ints("embed_dims", embed_dims, 1)
        check_ints("depths", depths, 0)
        for dim, ratio in zip(embed_dims, mlp_ratios):
            if check_real("each of mlp_ratios", ratio, 0.0) * dim < 1:
                raise ValueError(f"mlp_ratios must give each MLP a hidden width >= 1, got "
                                 f"{ratio!r} for {dim} channels")
        check_probability("drop_rate", drop_rate)
        check_probability("drop_path_rate", drop_path_rate)
        if not callable(norm_layer):
            raise TypeError(f"norm_layer must build a norm module (e.g. nn.BatchNorm2d), got "
                            f"{norm_layer!r}")
        if not (len(embed_dims) == len(depths) == len(mlp_ratios)):
            raise ValueError(f"embed_dims, depths and mlp_ratios must have one entry per stage, "
                             f"got {len(embed_dims)}, {len(depths)} and {len(mlp_ratios)}")
        self.in_channels = in_channels
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.num_stages = len(depths)
        # Linear ramp over all blocks in order; made on the CPU so that building under
        # `with torch.device("meta")` still gives Python floats.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        first = 0
        for i in range(self.num_stages):
            if i == 0:
                embed = StemConv(in_channels, embed_dims[0], norm_layer)
            else:
                embed = OverlapPatchEmbed(embed_dims[i - 1], embed_dims[i], norm_layer)
            blocks = nn.ModuleList(
                Block(embed_dims[i], mlp_ratios[i], norm_layer, drop=drop_rate,
                      drop_path_rate=rates[first + j])
                for j in range(depths[i]))
            first += depths[i]
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i]))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Conv2d: normal(0, sqrt(2 / fan_out)), bias 0; LayerNorm: 1, 0 (docs/model.md#weight-initialisation)."""
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The normalised (B, in_channels, H, W) image -> the stage outputs, strides 4 to 32."""
        check_image_batch("x", x, self.in_channels)
        outs = []
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x)
            # LayerNorm over channels of the (B, N, C) tokens = over the last dim channels-last.
            # Its output is channels-last in memory: kept so for a channels_last model,
            # made contiguous (as the official code) otherwise.
            channels_last = not x.is_contiguous() and \
                x.is_contiguous(memory_format=torch.channels_last)
            x = getattr(self, f"norm{i}")(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            if not channels_last:
                x = x.contiguous()
            outs.append(x)
        return outs


def mscan(size: str, **kwargs) -> MSCAN:
    """MSCAN-T/S/B/L with the official settings (docs/model.md#sizes); ``kwargs`` override them."""
    settings = dict(MSCAN_SETTINGS[_size_key(size)], mlp_ratios=MLP_RATIOS)
    settings.update(kwargs)
    return MSCAN(**settings)


_SIZE_ALIASES = {"t": "t", "tiny": "t", "s": "s", "small": "s", "b": "b", "base": "b",
                 "l": "l", "large": "l"}


def _size_key(size: str) -> str:
    key = _SIZE_ALIASES.get(str(size).strip().lower()) if isinstance(size, str) else None
    if key is None:
        raise ValueError(f"size must be one of 't', 's', 'b', 'l' (or 'tiny', 'small', 'base', "
                         f"'large'), got {size!r}")
    return key
