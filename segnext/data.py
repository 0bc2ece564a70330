"""Datasets and transforms for ``segnext.train`` / ``segnext.predict``.

A sample is ``(image, label)``: ``image`` a float32 (3, H, W) tensor normalised with the official
mean/std (RGB, 0-255 scale), ``label`` an int64 (H, W) tensor of class indices, 255 = ignore.

- ``SyntheticShapes``: rectangles, ellipses and triangles of random classes on noisy
  backgrounds, generated on the fly from (seed, split, index), with exact masks. Each class has
  its own colour, so a model learns it in minutes; it needs no files.
- ``ADE20K``: a folder in the ADE20K layout (``images/{training,validation}/*.jpg``,
  ``annotations/{training,validation}/*.png``) with the official pipelines (docs/model.md,
  "Training recipe" and "Test pipeline"): reduce_zero_label, random rescale 0.5-2.0 of
  (2048, 512), random crop with cat_max_ratio 0.75, flip, photometric distortion, normalise,
  pad (label 255); for validation, keep-ratio resize to (2048, 512) then to a multiple of 32,
  the label at its original size.

Training samples come from ``dataset.sample(index, generator)``: every random choice of the
augmentation is drawn from that generator, so the training stream is a function of the run's
seed and step whatever the number of loader workers (``segnext.train`` derives one seed per
sample). ``dataset[index]`` gives the deterministic evaluation sample.

ADE20K files are read by ``segnext.images`` (Pillow); the synthetic data needs no files.
"""
from __future__ import annotations

import colorsys
import hashlib
import math
import os
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ._validate import check_int, check_ints, check_real
from .images import read_image, read_label

# The official normalisation (RGB order, 0-255 scale) and ignore label
# (docs/model.md#training-recipe).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255
ADE20K_CLASSES = 150
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

Size = Tuple[int, int]


class DataError(ValueError):
    """A dataset file that cannot be used: unreadable, image and annotation of different sizes,
    labels outside the classes."""


def derive_seed(*parts) -> int:
    """A 63-bit seed that depends on every part (ints or strings), for torch.Generator."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An int in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator))


def _coin(generator: torch.Generator) -> bool:
    return _randint(generator, 0, 2) == 1


# ---------------------------------------------------------------------------------------------
# Transforms (images are float (3, H, W) on the 0-255 scale until normalised)

def normalize(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB on the 0-255 scale -> float32 normalised with the official mean/std."""
    mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
    return (image.float() - mean) / std


def rescale_size(height: int, width: int, scale: Sequence[float]) -> Size:
    """mmcv's keep-ratio rescale: the largest size with the same aspect ratio whose long side
    is at most max(scale) and short side at most min(scale) (it enlarges small images too)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def round_up_to_multiple(height: int, width: int, divisor: int) -> Size:
    """The size rounded up to multiples of ``divisor`` (mmseg's ResizeToMultiple)."""
    return math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor


def resize_image(image: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear resize of a (3, H, W) image to ``size`` = (H', W')."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image.float()
    return F.interpolate(image[None].float(), size=size, mode="bilinear",
                         align_corners=False)[0]


def resize_label(label: torch.Tensor, size: Size) -> torch.Tensor:
    """Nearest-neighbour resize of an (H, W) class map to ``size`` = (H', W')."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    return F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()


def prepare_test_image(image: torch.Tensor, scale: Optional[Sequence[int]] = (2048, 512),
               size_divisor: Optional[int] = 32) -> torch.Tensor:
    """The official test pipeline of one (3, H, W) 0-255 image: keep-ratio resize to fit
    ``scale`` (None keeps the size), then resize up to a multiple of ``size_divisor`` (None
    skips it), then normalise."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3 or \
            image.numel() == 0:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a non-empty (3, H, W) tensor, got {got}")
    if scale is not None and (len(scale) != 2 or min(scale) < 1):
        raise ValueError(f"scale must be two sizes >= 1 (or None), got {tuple(scale)!r}")
    if size_divisor is not None and (isinstance(size_divisor, bool) or
                                     not isinstance(size_divisor, int) or size_divisor < 0):
        raise ValueError(f"size_divisor must be an int >= 1 (0 or None: no rounding), got "
                         f"{size_divisor!r}")
    height, width = image.shape[-2:]
    if scale is not None:
        height, width = rescale_size(height, width, scale)
    if size_divisor:
        height, width = round_up_to_multiple(height, width, size_divisor)
    return normalize(resize_image(image, (height, width)))


def reduce_zero_label(label: torch.Tensor) -> torch.Tensor:
    """ADE20K's annotation 0 ("other") becomes 255 (ignored) and k becomes k-1."""
    label = label.long()
    return torch.where(label == 0, torch.full_like(label, IGNORE_INDEX), label - 1)


def _rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB 0-255 -> hue in degrees [0, 360), saturation [0, 1], value 0-255."""
    r, g, b = image
    value, _ = image.max(dim=0)
    delta = value - image.min(dim=0).values
    saturation = torch.where(value > 0, delta / value.clamp(min=1e-12), torch.zeros_like(value))
    safe = delta.clamp(min=1e-12)
    hue = torch.where(value == r, (g - b) / safe,
                      torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(delta > 0, (hue * 60) % 360, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = hsv
    sector = hue / 60
    i = sector.floor().long() % 6
    f = sector - sector.floor()
    p = value * (1 - saturation)
    q = value * (1 - saturation * f)
    t = value * (1 - saturation * (1 - f))
    r = torch.stack([value, q, p, p, t, value]).gather(0, i[None])[0]
    g = torch.stack([t, value, value, q, p, p]).gather(0, i[None])[0]
    b = torch.stack([p, p, t, value, value, q]).gather(0, i[None])[0]
    return torch.stack([r, g, b])


def photometric_distortion(image: torch.Tensor, generator: torch.Generator,
                           brightness_delta: float = 32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta: float = 18) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion, each step with probability 1/2: brightness, contrast
    (before or after the colour steps, at random), saturation, hue (in degrees here)."""
    def contrast(img):
        if _coin(generator):
            img = (img * _uniform(generator, *contrast_range)).clamp(0, 255)
        return img

    if _coin(generator):
        image = (image + _uniform(generator, -brightness_delta, brightness_delta)).clamp(0, 255)
    contrast_first = _coin(generator)
    if contrast_first:
        image = contrast(image)
    if _coin(generator):
        hsv = _rgb_to_hsv(image)
        hsv[1] = (hsv[1] * _uniform(generator, *saturation_range)).clamp(0, 1)
        image = _hsv_to_rgb(hsv)
    if _coin(generator):
        hsv = _rgb_to_hsv(image)
        hsv[0] = (hsv[0] + _randint(generator, -int(hue_delta), int(hue_delta) + 1)) % 360
        image = _hsv_to_rgb(hsv)
    if not contrast_first:
        image = contrast(image)
    return image


def random_crop(image: torch.Tensor, label: torch.Tensor, crop: Size,
                generator: torch.Generator, cat_max_ratio: float = 1.0) -> Tuple[torch.Tensor,
                                                                                 torch.Tensor]:
    """A random crop of at most ``crop``; with ``cat_max_ratio`` < 1, up to 10 more draws are
    made while one class covers that share or more of the crop's labelled pixels (mmseg)."""
    height, width = label.shape
    crop_h, crop_w = min(crop[0], height), min(crop[1], width)

    def draw():
        top = _randint(generator, 0, height - crop_h + 1)
        left = _randint(generator, 0, width - crop_w + 1)
        return top, left

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            window = label[top:top + crop_h, left:left + crop_w]
            counts = torch.bincount(window[window != IGNORE_INDEX].flatten())
            counts = counts[counts > 0]
            if counts.numel() > 1 and counts.max() < cat_max_ratio * counts.sum():
                break
            top, left = draw()
    return (image[:, top:top + crop_h, left:left + crop_w],
            label[top:top + crop_h, left:left + crop_w])


def pad_to(image: torch.Tensor, label: torch.Tensor, size: Size) -> Tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """Pad at the bottom and right to ``size``: the (normalised) image with 0, the label
    with 255."""
    pad_h, pad_w = size[0] - image.shape[1], size[1] - image.shape[2]
    if pad_h <= 0 and pad_w <= 0:
        return image, label
    pad = (0, max(pad_w, 0), 0, max(pad_h, 0))
    return F.pad(image, pad, value=0.0), F.pad(label, pad, value=IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------
# Synthetic shapes

class Shape(NamedTuple):
    """One shape of a synthetic image, in pixels; pixel (i, j) is covered when its centre
    (i + 0.5, j + 0.5) is inside.

    ``kind``: "rectangle" (``params`` = top, left, bottom, right), "ellipse" (centre y, centre
    x, radius y, radius x) or "triangle" (y0, x0, y1, x1, y2, x2). ``label``: its class.
    """
    kind: str
    label: int
    params: Tuple[float, ...]


SHAPE_KINDS = ("rectangle", "ellipse", "triangle")


def shape_mask(shape: Shape, height: int, width: int) -> torch.Tensor:
    """(H, W) bool: the pixels ``shape`` covers."""
    y = (torch.arange(height, dtype=torch.float64) + 0.5)[:, None]
    x = (torch.arange(width, dtype=torch.float64) + 0.5)[None, :]
    p = shape.params
    if shape.kind == "rectangle":
        top, left, bottom, right = p
        return (y >= top) & (y < bottom) & (x >= left) & (x < right)
    if shape.kind == "ellipse":
        cy, cx, ry, rx = p
        return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
    if shape.kind == "triangle":
        y0, x0, y1, x1, y2, x2 = p
        # Inside when the point is on the same side of all three edges (either orientation).
        d0 = (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)
        d1 = (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1)
        d2 = (x0 - x2) * (y - y2) - (y0 - y2) * (x - x2)
        return ((d0 >= 0) & (d1 >= 0) & (d2 >= 0)) | ((d0 <= 0) & (d1 <= 0) & (d2 <= 0))
    raise ValueError(f"unknown shape kind {shape.kind!r}; expected one of {SHAPE_KINDS}")


def class_colours(num_classes: int) -> torch.Tensor:
    """(num_classes, 3) float RGB 0-255: class 0 (background) has none (it is grey noise);
    classes 1.. get saturated colours of evenly spaced hues."""
    colours = torch.zeros(num_classes, 3)
    for k in range(1, num_classes):
        hue = (k - 1) / max(num_classes - 1, 1)
        colours[k] = torch.tensor(colorsys.hsv_to_rgb(hue, 0.85, 0.95)) * 255
    return colours


class SyntheticShapes(Dataset):
    """1-4 rectangles, ellipses and triangles of classes 1..num_classes-1 on a noisy grey
    background (class 0). Sample ``index`` of ``split`` depends only on (seed, split, index).

    Each class has its own colour (``colours``), jittered per shape and per pixel, and later
    shapes cover earlier ones; the label is exact (``shapes(index)`` gives the geometry).
    """

    def __init__(self, num_classes: int = 8, size: Union[int, Size] = 128, length: int = 2000,
                 seed: int = 0, split: str = "train"):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or \
                not 2 <= num_classes <= IGNORE_INDEX:
            raise ValueError(f"the synthetic data needs num_classes in [2, {IGNORE_INDEX}] "
                             f"(background, at least one shape class, and no class "
                             f"{IGNORE_INDEX}: that label marks ignored pixels), got "
                             f"{num_classes!r}")
        check_int("length", length, 1)
        check_int("seed", seed, 0)
        size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
        if len(check_ints("size", size, 1)) != 2:
            raise ValueError(f"size must be an int or (height, width), got {size!r}")
        self.num_classes = num_classes
        self.size = tuple(size)
        self.length = length
        self.seed = seed
        self.split = split
        self.colours = class_colours(num_classes)

    def __len__(self) -> int:
        return self.length

    def _generator(self, index: int) -> torch.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        return torch.Generator().manual_seed(derive_seed("shapes", self.seed, self.split, index))

    def _draw_shape(self, generator: torch.Generator) -> Shape:
        height, width = self.size
        kind = SHAPE_KINDS[_randint(generator, 0, len(SHAPE_KINDS))]
        label = _randint(generator, 1, self.num_classes)
        extent = _uniform(generator, 0.15, 0.5) * min(height, width)
        cy, cx = _uniform(generator, 0, height), _uniform(generator, 0, width)
        if kind == "rectangle":
            half_h = extent * _uniform(generator, 0.3, 0.7)
            half_w = extent * _uniform(generator, 0.3, 0.7)
            return Shape(kind, label, (cy - half_h, cx - half_w, cy + half_h, cx + half_w))
        if kind == "ellipse":
            return Shape(kind, label, (cy, cx, extent * _uniform(generator, 0.3, 0.7),
                                       extent * _uniform(generator, 0.3, 0.7)))
        start = _uniform(generator, 0, 2 * math.pi)
        corners = []
        for i in range(3):
            angle = start + 2 * math.pi * i / 3 + _uniform(generator, -0.4, 0.4)
            radius = extent * _uniform(generator, 0.5, 0.8)
            corners += [cy + radius * math.sin(angle), cx + radius * math.cos(angle)]
        return Shape(kind, label, tuple(corners))

    def _draw_shapes(self, generator: torch.Generator) -> List[Shape]:
        return [self._draw_shape(generator) for _ in range(_randint(generator, 1, 5))]

    def shapes(self, index: int) -> List[Shape]:
        """The shapes of sample ``index``, in painting order."""
        return self._draw_shapes(self._generator(index))

    def render(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sample ``index`` before normalisation: uint8 (3, H, W) image, int64 (H, W) label."""
        generator = self._generator(index)
        shapes = self._draw_shapes(generator)
        height, width = self.size
        # Background: a grey level with a slight tint and a linear ramp in a random direction.
        grey = _uniform(generator, 70, 180)
        tint = torch.tensor([_uniform(generator, -8, 8) for _ in range(3)])
        angle = _uniform(generator, 0, 2 * math.pi)
        ys = torch.linspace(-1, 1, height)[:, None]
        xs = torch.linspace(-1, 1, width)[None, :]
        ramp = 30 * (math.sin(angle) * ys + math.cos(angle) * xs)
        image = (grey + ramp)[None] + tint[:, None, None]
        image = image.expand(3, height, width).clone()
        label = torch.zeros(height, width, dtype=torch.int64)
        for shape in shapes:
            mask = shape_mask(shape, height, width)
            jitter = torch.tensor([_uniform(generator, -12, 12) for _ in range(3)])
            image[:, mask] = (self.colours[shape.label] + jitter)[:, None]
            label[mask] = shape.label
        image += 10 * torch.randn(image.shape, generator=generator)
        return image.round().clamp(0, 255).to(torch.uint8), label

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, label = self.render(index)
        return normalize(image), label

    def sample(self, index: int, generator: torch.Generator) -> Tuple[torch.Tensor,
                                                                      torch.Tensor]:
        """A training sample: the rendered image, flipped horizontally with probability 1/2."""
        image, label = self[index]
        if _coin(generator):
            image, label = image.flip(-1), label.flip(-1)
        return image, label


# ---------------------------------------------------------------------------------------------
# ADE20K

class ADE20K(Dataset):
    """ADE20K (SceneParsing, 150 classes) in the mmseg folder layout under ``root``.

    ``split``: "training" or "validation". ``dataset[i]`` is the validation sample (resized for
    the model, the label at its original size, so that metrics are taken at full resolution);
    ``dataset.sample(i, generator)`` the training sample (crop ``crop_size``).
    """

    num_classes = ADE20K_CLASSES

    def __init__(self, root: Union[str, os.PathLike], split: str = "training",
                 crop_size: Union[int, Size] = 512, scale: Size = (2048, 512),
                 ratio_range: Tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 test_size_divisor: int = 32):
        crop_size = (crop_size, crop_size) if isinstance(crop_size, int) and \
            not isinstance(crop_size, bool) else crop_size
        for name, pair in (("crop_size", crop_size), ("scale", scale)):
            if len(check_ints(name, pair, 1)) != 2:
                raise ValueError(f"{name} must be (height, width), got {pair!r}")
        if len(ratio_range) != 2 or check_real("ratio_range", ratio_range[0], 1e-3, 1e3) > \
                check_real("ratio_range", ratio_range[1], 1e-3, 1e3):
            raise ValueError(f"ratio_range must be (low, high) with low <= high, got "
                             f"{tuple(ratio_range)!r}")
        check_real("cat_max_ratio", cat_max_ratio, 0.0, 1.0)
        check_int("test_size_divisor", test_size_divisor, 0)
        self.root = Path(root)
        self.split = split
        self.crop_size = tuple(crop_size)
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)
        self.cat_max_ratio = cat_max_ratio
        self.test_size_divisor = test_size_divisor
        self.samples = self._find_samples()

    def _find_samples(self) -> List[Tuple[Path, Path]]:
        image_dir = self.root / "images" / self.split
        label_dir = self.root / "annotations" / self.split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"ADE20K folder not found: {folder} (expected "
                                        f"images/{self.split} and annotations/{self.split} "
                                        f"under {self.root})")
        images = sorted(p for p in image_dir.iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise FileNotFoundError(f"no images (*.jpg, *.png) in {image_dir}")
        samples = []
        for image in images:
            label = label_dir / (image.stem + ".png")
            if not label.is_file():
                raise FileNotFoundError(f"no annotation for {image.name}: expected {label}")
            samples.append((image, label))
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.samples[index]
        try:
            image, label = read_image(image_path), reduce_zero_label(read_label(label_path))
        except (OSError, ValueError) as exc:  # Pillow's UnidentifiedImageError is an OSError
            raise DataError(f"ADE20K sample {image_path.name}: {exc}") from None
        if image.shape[-2:] != label.shape:
            raise DataError(f"{image_path.name}: image {tuple(image.shape[-2:])} and "
                            f"annotation {tuple(label.shape)} differ in size")
        outside = label[(label != IGNORE_INDEX) & (label >= self.num_classes)]
        if outside.numel():
            raise DataError(f"{label_path}: annotation values up to {int(outside.max()) + 1}; "
                            f"ADE20K has classes 1..{self.num_classes} (0 = other)")
        return image, label

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, label = self._read(index)
        return prepare_test_image(image, self.scale, self.test_size_divisor), label

    def sample(self, index: int, generator: torch.Generator) -> Tuple[torch.Tensor,
                                                                      torch.Tensor]:
        image, label = self._read(index)
        ratio = _uniform(generator, *self.ratio_range)
        size = rescale_size(*label.shape, (int(self.scale[0] * ratio),
                                           int(self.scale[1] * ratio)))
        image, label = resize_image(image, size), resize_label(label, size)
        image, label = random_crop(image, label, self.crop_size, generator, self.cat_max_ratio)
        if _coin(generator):
            image, label = image.flip(-1), label.flip(-1)
        image = normalize(photometric_distortion(image, generator))
        return pad_to(image, label, self.crop_size)
