"""Colours for class maps: ``palette(num_classes)``, ``colorize(labels, palette)`` and
``overlay(image, colours)``.

The palette is the bit-interleaved one of PASCAL VOC's devkit, extended to any class count:
class k takes its bits three at a time, one each for red, green and blue, from the highest bit
of each channel down. It is deterministic, needs no table, and neighbouring class indices get
clearly different colours (class 0 is black).
"""
from __future__ import annotations

import torch

IGNORE_COLOUR = (255, 255, 255)  # what an ignored pixel (label 255 in a ground truth) is drawn as


def palette(num_classes: int) -> torch.Tensor:
    """(num_classes, 3) uint8 RGB colours, one per class."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    colours = torch.zeros(num_classes, 3, dtype=torch.uint8)
    for k in range(num_classes):
        rgb = [0, 0, 0]
        bits, shift = k, 7
        while bits and shift >= 0:
            for channel in range(3):
                rgb[channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
            shift -= 1
        colours[k] = torch.tensor(rgb, dtype=torch.uint8)
    return colours


def colorize(labels: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """(H, W) class indices -> (H, W, 3) uint8 RGB; indices outside the palette (e.g. 255 =
    ignore) are drawn in ``IGNORE_COLOUR``."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or \
            labels.is_complex() or labels.dtype == torch.bool:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an integer tensor of class indices, got {got}")
    labels = labels.long()
    known = (labels >= 0) & (labels < colours.shape[0])
    out = torch.empty(*labels.shape, 3, dtype=torch.uint8)
    out[...] = torch.tensor(IGNORE_COLOUR, dtype=torch.uint8)
    out[known] = colours[labels[known]]
    return out


def overlay(image: torch.Tensor, colours: torch.Tensor, opacity: float = 0.5) -> torch.Tensor:
    """(H, W, 3) uint8: the (H, W, 3) class colours blended over the uint8 (3, H, W) image."""
    blended = image.permute(1, 2, 0).float() * (1 - opacity) + colours.float() * opacity
    return blended.round().clamp(0, 255).to(torch.uint8)
