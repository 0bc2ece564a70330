"""Image files, read and written with Pillow (``pip install pillow``).

Reading: ``open_image`` is the one reader. It opens a file and refuses, from the header alone,
an image that cannot be brought to the 8-bit scale the model was trained on
(``UnusableImageError``). ``check_image`` stops there, to check files before any work;
``read_image`` goes on to decode the pixels. ``read_label`` reads an annotation PNG.

Writing: ``write_mask`` (a class map as a palette PNG) and ``write_rgb`` (an RGB PNG).

The 8-bit scale:
- 8-bit images (grey, palette, RGB, RGBA, CMYK, ...) are converted to RGB, alpha dropped.
- 16-bit grey images are scaled by 255/65535. Pillow reduces 16-bit RGB to 8 bits itself.
- Float images must hold finite values in [0, 1] and are scaled by 255.
- A 32-bit integer image has no agreed full scale and is refused.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from .palette import colorize

PathLike = Union[str, os.PathLike]

# Pillow's high-depth modes and their full scale. Pillow reads 16-bit grey PNG/TIFF as "I;16*"
# (0-65535), and 16-bit grey PNG (older Pillow) or PGM of any maxval as "I" rescaled to
# 0-65535; 16-bit RGB(A) it reduces to 8 bits itself. Float images ("F") hold [0, 1] by
# convention. A 32-bit integer image ("I" from TIFF and the like) has no agreed full scale.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")


class UnusableImageError(ValueError):
    """An image file that cannot be brought to the 8-bit scale; ``problem`` says why."""

    def __init__(self, path: PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading image files needs Pillow: pip install pillow") from exc
    return Image


def image_mode_problem(img) -> Optional[str]:
    """Why ``read_image`` cannot bring this opened Pillow image to the 8-bit scale, from its
    header alone (None when it can; a float image's values are checked when it is read)."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        return None
    if mode == "I":
        if img.format in _SIXTEEN_BIT_I_FORMATS:
            return None
        return (f"a 32-bit integer image (Pillow mode I, {img.format or 'unknown'} format) has "
                "no standard full scale; save it with 8 or 16 bits per channel")
    if mode.startswith(("I;", "F;")):
        return f"Pillow mode {mode} is not supported; save the image with 8 or 16 bits per channel"
    return None


@contextlib.contextmanager
def open_image(path: PathLike) -> Iterator:
    """The opened Pillow image of ``path`` (only its header is read), closed on exit.

    Raises FileNotFoundError, PIL.UnidentifiedImageError for a file that is not an image, and
    ``UnusableImageError`` for an image without a known 8-bit scale (``image_mode_problem``).
    """
    Image = _pil()
    with Image.open(path) as img:
        problem = image_mode_problem(img)
        if problem:
            raise UnusableImageError(path, problem)
        yield img


def check_image(path: PathLike) -> None:
    """Raise what ``open_image`` raises, without decoding the pixels."""
    with open_image(path):
        pass


def read_image(path: PathLike) -> torch.Tensor:
    """An image file as a uint8 (3, H, W) RGB tensor on the 8-bit scale the model expects (see
    the module docstring); grey is repeated over R, G, B.

    Raises what ``open_image`` raises, and ``UnusableImageError`` (a ValueError) for a float
    image outside [0, 1].
    """
    with open_image(path) as img:
        if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
            grey = torch.from_numpy(_as_float64(img))
            if img.mode == "F":
                finite = grey[torch.isfinite(grey)]
                if finite.numel() < grey.numel() or (finite.numel() and (
                        float(finite.min()) < 0.0 or float(finite.max()) > 1.0)):
                    span = (f"[{float(finite.min()):g}, {float(finite.max()):g}]"
                            if finite.numel() else "no finite value")
                    nonfinite = " and NaN or infinity" if finite.numel() < grey.numel() else ""
                    raise UnusableImageError(path, f"a float image must hold values in [0, 1], "
                                                   f"got {span}{nonfinite}")
                scaled = grey * 255.0
            else:
                scaled = grey * (255.0 / 65535.0)
            return scaled.round().clamp(0, 255).to(torch.uint8).expand(3, -1, -1).contiguous()
        rgb = img.convert("RGB")
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def _as_float64(img):
    import numpy as np  # Pillow's buffer protocol gives the right dtype and byte order
    return np.asarray(img).astype(np.float64)


def read_label(path: PathLike) -> torch.Tensor:
    """A label PNG (8-bit grey or palette: the pixel values are the class indices) as an int64
    (H, W) tensor."""
    Image = _pil()
    with Image.open(path) as img:
        if img.mode not in ("L", "P"):
            raise ValueError(f"{path}: a label map must be an 8-bit grey or palette PNG, "
                             f"got mode {img.mode}")
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return data.view(img.height, img.width).long()


def write_mask(path: Path, labels: torch.Tensor, colours: torch.Tensor) -> None:
    """A palette PNG of the (H, W) class map (an RGB PNG beyond 256 classes)."""
    Image = _pil()
    height, width = labels.shape
    if colours.shape[0] <= 256:
        img = Image.frombytes("P", (width, height), labels.to(torch.uint8).numpy().tobytes())
        img.putpalette(colours.flatten().tolist())
    else:
        rgb = colorize(labels, colours)
        img = Image.frombytes("RGB", (width, height), rgb.numpy().tobytes())
    img.save(path)


def write_rgb(path: Path, rgb: torch.Tensor) -> None:
    """An RGB PNG of an (H, W, 3) uint8 tensor."""
    Image = _pil()
    height, width, _ = rgb.shape
    Image.frombytes("RGB", (width, height), rgb.contiguous().numpy().tobytes()).save(path)
