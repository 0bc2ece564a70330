"""SegNeXt = MSCAN backbone + LightHamHead, with the official state_dict layout.

The model's keys are ``backbone.*`` and ``decode_head.*`` exactly as mmseg's EncoderDecoder
(docs/model.md#checkpoint-keys). ``forward`` returns logits at 1/8 of the input size, as the head
does; ``predict`` / ``upsample_logits`` bring them to the input size as mmseg's test path does.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_image_batch, check_int
from .ham_head import LightHamHead
from .mscan import MSCAN, _size_key, mscan

# docs/model.md#sizes: head widths per size and the NMF rank the official checkpoints were trained with
# (16 for T/S; the original release leaves B/L at the default 64).
HEAD_SETTINGS: Dict[str, dict] = {
    "t": dict(in_channels=(64, 160, 256), channels=256, ham_channels=256, nmf_rank=16),
    "s": dict(in_channels=(128, 320, 512), channels=256, ham_channels=256, nmf_rank=16),
    "b": dict(in_channels=(128, 320, 512), channels=512, ham_channels=512, nmf_rank=64),
    "l": dict(in_channels=(128, 320, 512), channels=1024, ham_channels=1024, nmf_rank=64),
}


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (align_corners False) of (B, K, h, w) logits to ``size`` = (H, W)."""
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be two ints >= 1 (H, W), got {tuple(size)!r}")
    size = tuple(int(s) for s in size)
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegNeXt(nn.Module):
    """Encoder-decoder segmenter: ``backbone`` (MSCAN) and ``decode_head`` (LightHamHead)."""

    def __init__(self, backbone: MSCAN, decode_head: LightHamHead):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    def forward(self, img: torch.Tensor, bases: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Logits (B, num_classes, ceil(H/8), ceil(W/8)) of a normalised (B, 3, H, W) image.

        ``bases`` / ``generator`` fix the NMF's random bases (see LightHamHead.forward).
        """
        check_image_batch("img", img, self.backbone.in_channels)
        return self.decode_head(self.backbone(img), bases=bases, generator=generator)

    @torch.no_grad()
    def predict(self, img: torch.Tensor, bases: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Logits at the input size, without gradient. The mode is left as it is: call
        ``.eval()`` first for inference (BN running stats, 7 NMF steps, no dropout)."""
        logits = self(img, bases=bases, generator=generator)
        return upsample_logits(logits, img.shape[-2:])


def build(size: str, num_classes: int = 150, *, in_channels: int = 3,
          drop_path_rate: Optional[float] = None, drop_rate: float = 0.0,
          norm_layer=nn.BatchNorm2d, dropout_ratio: float = 0.1,
          nmf_rank: Optional[int] = None, nmf_kwargs: Optional[dict] = None,
          checkpoint=None) -> SegNeXt:
    """SegNeXt-T/S/B/L (``size`` 't', 's', 'b', 'l' or 'tiny'... 'large') with the official
    settings (docs/model.md#sizes). ``drop_path_rate`` and ``nmf_rank`` default to the size's official value;
    ``nmf_kwargs`` are further ``segnext_kernels.NMF2D`` arguments (e.g. ``grad="one_step"``).
    ``norm_layer`` builds the backbone's BN-type norms (``nn.SyncBatchNorm`` for the original
    configs). ``checkpoint`` (a path or a state_dict) is loaded strictly with
    ``segnext.load_checkpoint``.
    """
    key = _size_key(size)
    check_int("num_classes", num_classes, 1)
    if nmf_rank is not None:
        check_int("nmf_rank", nmf_rank, 1)
    backbone_kw = dict(in_channels=in_channels, drop_rate=drop_rate, norm_layer=norm_layer)
    if drop_path_rate is not None:
        backbone_kw["drop_path_rate"] = drop_path_rate
    backbone = mscan(key, **backbone_kw)

    head = dict(HEAD_SETTINGS[key])
    official_rank = head.pop("nmf_rank")
    nmf = dict(nmf_kwargs or {})
    if nmf_rank is not None and nmf.get("R", nmf_rank) != nmf_rank:
        raise ValueError(f"nmf_rank={nmf_rank} contradicts nmf_kwargs['R']={nmf['R']}")
    nmf.setdefault("R", official_rank if nmf_rank is None else nmf_rank)
    decode_head = LightHamHead(num_classes=num_classes, dropout_ratio=dropout_ratio,
                               nmf_kwargs=nmf, **head)
    model = SegNeXt(backbone, decode_head)
    if checkpoint is not None:
        from .checkpoint import load_checkpoint
        load_checkpoint(model, checkpoint, strict=True)
    return model


def segnext_t(num_classes: int = 150, **kwargs) -> SegNeXt:
    """SegNeXt-T (MSCAN-T, 256-channel head, NMF rank 16); ``kwargs`` as ``build``."""
    return build("t", num_classes, **kwargs)


def segnext_s(num_classes: int = 150, **kwargs) -> SegNeXt:
    """SegNeXt-S (MSCAN-S, 256-channel head, NMF rank 16); ``kwargs`` as ``build``."""
    return build("s", num_classes, **kwargs)


def segnext_b(num_classes: int = 150, **kwargs) -> SegNeXt:
    """SegNeXt-B (MSCAN-B, 512-channel head, NMF rank 64); ``kwargs`` as ``build``."""
    return build("b", num_classes, **kwargs)


def segnext_l(num_classes: int = 150, **kwargs) -> SegNeXt:
    """SegNeXt-L (MSCAN-L, 1024-channel head, NMF rank 64); ``kwargs`` as ``build``."""
    return build("l", num_classes, **kwargs)

