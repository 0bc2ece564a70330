"""``python -m segnext.predict``: segment images with a SegNeXt checkpoint.

    python -m segnext.predict --checkpoint segnext_mscan-t_ade20k.pth photo.jpg
    python -m segnext.predict --checkpoint runs/shapes/latest.pth --out masks *.png
    python -m segnext.predict --checkpoint city.pth --mode slide --crop 1024 --stride 768 x.png

For each image it writes ``<out>/<name>_mask.png`` (the class map as a palette PNG: viewers show
the colours, and reading it back gives the class indices) and ``<out>/<name>_overlay.png`` (the
colours blended over the image), and prints the inference time.

Checkpoints: official ones (original or mmseg key names), any SegNeXt state_dict, and
``segnext.train`` checkpoints. The model size and class count are read from the checkpoint
unless ``--model`` / ``--num-classes`` say otherwise.

Inference follows the official test pipelines (``segnext.inference``,
docs/model.md#test-pipeline):
- ``whole`` (ADE20K, COCO-Stuff): resize keeping the aspect ratio to fit ``--scale``
  (default 2048 x 512), then to a multiple of 32; one forward; logits resized to the image.
- ``slide`` (Cityscapes): resize keeping the aspect ratio to fit ``--scale`` (default
  2048 x 1024); ``--crop`` windows every ``--stride`` pixels, logits of overlapping windows
  averaged; logits resized to the image.
The NMF bases of the decoder are random; they come from a generator seeded with ``--seed``, so
a prediction is reproducible.

Errors (a missing file, a file that is not an image, a checkpoint that does not fit the model)
are reported in one line, with exit status 2.

The parts live in their own modules: ``segnext.inference`` (whole / slide inference),
``segnext.images`` (reading and writing image files), ``segnext.checkpoint_model`` (the model a
checkpoint file holds), ``segnext.palette`` (colours and the overlay).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

import segnext_kernels

from ._cli import ArgumentParser, check_backend, parse_device
from .checkpoint import error_summary
from .checkpoint_model import CheckpointFileError, load_model
from .images import UnusableImageError, check_image, read_image, write_mask, write_rgb
from .inference import DEFAULT_SCALES, predict_labels
from .palette import colorize, overlay, palette


class PredictError(Exception):
    """A user-facing problem (file, image, checkpoint), reported in one line."""


def check_images(paths: Sequence[Path]) -> None:
    """Fail before any work on a missing file, a non-image or two outputs of the same name."""
    stems = {}
    for path in paths:
        if not path.exists():
            raise PredictError(f"image not found: {path}")
        if not path.is_file():
            raise PredictError(f"not a file: {path}")
        try:
            check_image(path)  # the header says whether it is an image, and a usable one
        except UnusableImageError as exc:
            raise PredictError(f"cannot use {path}: {exc.problem}") from None
        except ImportError:
            raise PredictError("segnext.predict reads and writes images with Pillow: "
                               "pip install pillow") from None
        except Exception as exc:  # Pillow's UnidentifiedImageError, permissions...
            raise PredictError(f"not an image Pillow can read: {path} "
                               f"({error_summary(exc)})") from None
        if path.stem in stems:
            raise PredictError(f"{stems[path.stem]} and {path} would write the same output "
                               "files; segment them in separate runs")
        stems[path.stem] = path


# ---------------------------------------------------------------------------------------------
# Command line

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m segnext.predict", error_name="segnext.predict",
        description="Segment images with a SegNeXt checkpoint; writes a colour mask and an "
                    "overlay PNG per image.")
    p.add_argument("images", nargs="+", metavar="IMAGE", type=Path)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="official, state_dict or segnext.train checkpoint")
    p.add_argument("--model", choices=("t", "s", "b", "l"),
                   help="model size (default: read from the checkpoint)")
    p.add_argument("--num-classes", type=int,
                   help="class count (default: read from the checkpoint)")
    p.add_argument("--mode", choices=tuple(DEFAULT_SCALES), default="whole",
                   help="whole image (ADE20K) or sliding window (Cityscapes)")
    p.add_argument("--scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help="resize keeping the aspect ratio to fit these sides (default: "
                        "2048 512 for whole, 2048 1024 for slide)")
    p.add_argument("--keep-size", action="store_true",
                   help="do not resize to --scale (whole mode still rounds to a multiple "
                        "of 32)")
    p.add_argument("--crop", type=int, default=512, help="slide window size")
    p.add_argument("--stride", type=int, default=384, help="slide window step")
    p.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    p.add_argument("--opacity", type=float, default=0.5, help="mask opacity in the overlay")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto",
                   choices=("auto",) + segnext_kernels.backends.BACKENDS,
                   help="segnext_kernels backend for MSCA and NMF")
    p.add_argument("--seed", type=int, default=0, help="seed of the NMF bases")
    args = p.parse_args(argv)
    if args.crop < 1 or args.stride < 1:
        p.error(f"--crop and --stride must be >= 1, got {args.crop} and {args.stride}")
    if args.stride > args.crop:
        p.error(f"--stride must not exceed --crop (the windows would leave pixels between "
                f"them unpredicted), got --stride {args.stride} and --crop {args.crop}")
    if args.scale is not None and min(args.scale) < 1:
        p.error(f"--scale sides must be >= 1, got {args.scale[0]} {args.scale[1]}")
    if args.num_classes is not None and args.num_classes < 1:
        p.error(f"--num-classes must be >= 1, got {args.num_classes}")
    if not 0.0 <= args.opacity <= 1.0:
        p.error(f"--opacity must be in [0, 1], got {args.opacity}")
    if not 0 <= args.seed < 2**64:  # torch.Generator.manual_seed takes a 64-bit seed
        p.error(f"--seed must be in [0, 2**64 - 1], got {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out must be a folder, but {args.out} is a file")
    return args


def run(args: argparse.Namespace) -> List[Tuple[Path, Path]]:
    """Segment ``args.images``; returns the (mask, overlay) paths written."""
    check_images(args.images)
    check_backend(args.backend, PredictError)
    device = parse_device(args.device, PredictError)
    try:
        model, description = load_model(args.checkpoint, args.model, args.num_classes)
    except CheckpointFileError as exc:
        raise PredictError(str(exc)) from None
    model.to(device)
    colours = palette(model.decode_head.num_classes)
    print(f"{description}, from {args.checkpoint}; {args.mode} inference on {device}, "
          f"kernel backend {args.backend}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PredictError(f"cannot create the --out folder {args.out}: "
                           f"{exc.strerror or error_summary(exc)}") from None
    written = []
    with segnext_kernels.use_backend(args.backend):
        for path in args.images:
            try:
                image = read_image(path)
            except ValueError as exc:  # a float image outside [0, 1]
                raise PredictError(str(exc)) from None
            height, width = image.shape[-2:]
            # --keep-size: a scale the image already fits exactly, so no resize.
            scale = (max(height, width), min(height, width)) if args.keep_size else args.scale
            generator = torch.Generator(device).manual_seed(args.seed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            labels = predict_labels(model, image, args.mode, scale, args.crop, args.stride,
                                    generator).cpu()
            elapsed_ms = 1000 * (time.perf_counter() - started)
            mask_path = args.out / f"{path.stem}_mask.png"
            overlay_path = args.out / f"{path.stem}_overlay.png"
            try:
                write_mask(mask_path, labels, colours)
                write_rgb(overlay_path, overlay(image, colorize(labels, colours), args.opacity))
            except OSError as exc:
                raise PredictError(f"cannot write to {args.out}: "
                                   f"{exc.strerror or error_summary(exc)}") from None
            print(f"{path}: {width}x{height}, {elapsed_ms:.1f} ms -> {mask_path}, "
                  f"{overlay_path}")
            written.append((mask_path, overlay_path))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except PredictError as exc:
        print(f"segnext.predict: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
