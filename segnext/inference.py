"""Inference by the official test pipelines (docs/model.md#test-pipeline), single scale, no flip.

- ``whole_inference``: one forward of the whole (resized) image (ADE20K, COCO-Stuff).
- ``slide_inference``: ``crop`` x ``crop`` windows every ``stride`` pixels, logits averaged
  where they overlap (Cityscapes).
- ``predict_labels``: the class map of one uint8 RGB image: resize, normalise, either of the
  two, argmax.

The NMF bases of the decoder are random; pass a seeded ``generator`` for a reproducible result.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .data import prepare_test_image
from .model import SegNeXt, upsample_logits

# The keep-ratio resize of each mode: (long side, short side) at most.
DEFAULT_SCALES = {"whole": (2048, 512), "slide": (2048, 1024)}


def whole_inference(model: SegNeXt, image: torch.Tensor, output_size: Sequence[int],
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Logits (B, K, *output_size) of a normalised (B, 3, H, W) batch in one forward: resized
    to the input size, then to ``output_size``, as mmseg's whole inference."""
    logits = upsample_logits(model(image, generator=generator), image.shape[-2:])
    return upsample_logits(logits, output_size)


def slide_inference(model: SegNeXt, image: torch.Tensor, output_size: Sequence[int],
                    crop: int, stride: int,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Logits (B, K, *output_size) from ``crop`` x ``crop`` windows every ``stride`` pixels
    (the last window of a row or column flush with the border), averaged where windows
    overlap, as mmseg's slide inference."""
    if crop < 1 or stride < 1:
        raise ValueError(f"crop and stride must be >= 1, got {crop} and {stride}")
    if stride > crop:
        raise ValueError(f"stride ({stride}) must not exceed crop ({crop}): the windows would "
                         "leave pixels between them unpredicted")
    batch, _, height, width = image.shape
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    logits_sum, counts = None, image.new_zeros(batch, 1, height, width)
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride + crop, height), min(col * stride + crop, width)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            window = image[..., y1:y2, x1:x2]
            window_logits = upsample_logits(model(window, generator=generator),
                                            window.shape[-2:])
            if logits_sum is None:
                logits_sum = image.new_zeros(batch, window_logits.shape[1], height, width)
            logits_sum[..., y1:y2, x1:x2] += window_logits
            counts[..., y1:y2, x1:x2] += 1
    return upsample_logits(logits_sum / counts, output_size)


@torch.no_grad()
def predict_labels(model: SegNeXt, image: torch.Tensor, mode: str = "whole",
                   scale: Optional[Sequence[int]] = None, crop: int = 512, stride: int = 384,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The (H, W) class map of one uint8 (3, H, W) RGB image, by the official test pipeline of
    ``mode`` ("whole" or "slide"); ``scale`` None uses the mode's default. ``model`` should
    be in eval mode."""
    if mode not in DEFAULT_SCALES:
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3 or \
            image.numel() == 0:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) RGB tensor on the 0-255 scale, got {got}")
    device = next(model.parameters()).device
    original_size = image.shape[-2:]
    scale = DEFAULT_SCALES[mode] if scale is None else scale
    if mode == "whole":
        batch = prepare_test_image(image, scale, size_divisor=32)[None].to(device)
        logits = whole_inference(model, batch, original_size, generator)
    else:
        batch = prepare_test_image(image, scale, size_divisor=None)[None].to(device)
        logits = slide_inference(model, batch, original_size, crop, stride, generator)
    return logits.argmax(dim=1)[0]
