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

Inference follows the official test pipelines (architecture reference §6.1):
- ``whole`` (ADE20K, COCO-Stuff): resize keeping the aspect ratio to fit ``--scale``
  (default 2048 x 512), then to a multiple of 32; one forward; logits resized to the image.
- ``slide`` (Cityscapes): resize keeping the aspect ratio to fit ``--scale`` (default
  2048 x 1024); ``--crop`` windows every ``--stride`` pixels, logits of overlapping windows
  averaged; logits resized to the image.
The NMF bases of the decoder are random; they come from a generator seeded with ``--seed``, so
a prediction is reproducible.

Errors (a missing file, a file that is not an image, a checkpoint that does not fit the model)
are reported in one line, with exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

import segnext_kernels

from ._cli import ArgumentParser
from .checkpoint import LoadResult, _plain_state_dict, _read, load_checkpoint
from .data import image_mode_problem, prepare_test_image, read_image
from .model import SegNeXt, build, upsample_logits
from .mscan import MSCAN_SETTINGS
from .palette import colorize, palette

DEFAULT_SCALES = {"whole": (2048, 512), "slide": (2048, 1024)}
MAX_KEYS_SHOWN = 3


class PredictError(Exception):
    """A user-facing problem (file, image, checkpoint), reported in one line."""


# ---------------------------------------------------------------------------------------------
# Inference

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


def overlay(image: torch.Tensor, colours: torch.Tensor, opacity: float = 0.5) -> torch.Tensor:
    """(H, W, 3) uint8: the (H, W, 3) class colours blended over the uint8 (3, H, W) image."""
    blended = image.permute(1, 2, 0).float() * (1 - opacity) + colours.float() * opacity
    return blended.round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Checkpoints

def infer_model_size(state_dict) -> Optional[str]:
    """'t', 's', 'b' or 'l' from a SegNeXt state_dict's block counts and stage-1 width."""
    depths = []
    for stage in range(1, 5):
        prefix = f"backbone.block{stage}."
        blocks = {int(key[len(prefix):].split(".", 1)[0]) for key in state_dict
                  if key.startswith(prefix)}
        depths.append(max(blocks) + 1 if blocks else 0)
    stem = state_dict.get("backbone.patch_embed1.proj.3.weight")
    width = stem.shape[0] if stem is not None else None
    for size, settings in MSCAN_SETTINGS.items():
        if tuple(depths) == settings["depths"] and width == settings["embed_dims"][0]:
            return size
    return None


def parse_device(name: str, error=ValueError) -> torch.device:
    """The ``--device`` of a command line: cpu, cuda or cuda:N of a visible GPU; anything else
    raises ``error`` with a one-line message."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise error(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise error(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise error("--device cuda, but no CUDA GPU is visible to PyTorch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise error(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are "
                        "visible")
    return device


def error_summary(exc: BaseException) -> str:
    """``Type: first line of the message``; for torch.load's weights-only refusal, the line
    that says what was refused."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    detail = next((line for line in lines if line.startswith("WeightsUnpickler error")),
                  lines[0])
    return f"{type(exc).__name__}: {detail}"


def _listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    return shown + (", ..." if len(keys) > MAX_KEYS_SHOWN else "")


def mismatch_summary(result: LoadResult) -> str:
    """One line: how many keys are missing, unexpected and of another shape, with the first
    few of each."""
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing ({_listed(result.missing_keys)})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected "
                        f"({_listed(result.unexpected_keys)})")
    if result.mismatched_keys:
        shapes = [f"{k} {list(a)} vs {list(b)}" for k, a, b in result.mismatched_keys]
        problems.append(f"{len(shapes)} of another shape, checkpoint vs model "
                        f"({_listed(shapes)})")
    return "; ".join(problems)


def load_model(checkpoint: Path, model_size: Optional[str], num_classes: Optional[int]
               ) -> Tuple[SegNeXt, str]:
    """The SegNeXt of ``checkpoint`` (eval mode, on the CPU) and a description of it."""
    if not checkpoint.is_file():
        what = "is not a file" if checkpoint.exists() else "not found"
        raise PredictError(f"checkpoint {what}: {checkpoint}")
    try:
        ckpt = _read(checkpoint, weights_only=True)
        state = _plain_state_dict(ckpt)
    except (OSError, ValueError, TypeError) as exc:  # one line naming the file
        message = error_summary(exc).split(": ", 1)[-1]
        if not message.startswith("cannot read checkpoint"):
            message = f"cannot read checkpoint {checkpoint} (is it a PyTorch checkpoint?): " \
                      f"{error_summary(exc)}"
        raise PredictError(message) from None
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    if not any(key.startswith(("backbone.", "decode_head.")) for key in state) and \
            any(key.startswith("patch_embed1.") for key in state):
        raise PredictError(f"{checkpoint} holds backbone weights only (an ImageNet MSCAN "
                           "checkpoint?); prediction needs a full SegNeXt checkpoint")

    if model_size is None and "model" in meta:
        model_size = meta["model"]
        if model_size not in MSCAN_SETTINGS:
            raise PredictError(f"{checkpoint} names its model {model_size!r} (meta), expected "
                               "one of t, s, b, l; pass --model")
    model_size = model_size or infer_model_size(state)
    if model_size is None:
        raise PredictError(f"cannot tell the model size from {checkpoint} (is it a SegNeXt "
                           "checkpoint?); pass --model t|s|b|l")
    if num_classes is None and "num_classes" in meta:
        num_classes = meta["num_classes"]
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise PredictError(f"{checkpoint} gives its class count as {num_classes!r} (meta), "
                               "expected an int >= 1; pass --num-classes")
    if num_classes is None and "decode_head.conv_seg.weight" in state:
        num_classes = int(state["decode_head.conv_seg.weight"].shape[0])
    if num_classes is None:
        raise PredictError(f"cannot tell the class count from {checkpoint}; "
                           "pass --num-classes")

    name = f"SegNeXt-{model_size.upper()} with {num_classes} classes"
    try:
        model = build(model_size, num_classes)
    except (RuntimeError, MemoryError) as exc:  # e.g. a --num-classes too large to allocate
        raise PredictError(f"cannot build {name}: {error_summary(exc)}") from None
    try:
        result = load_checkpoint(model, ckpt, strict=False)
    except (ValueError, TypeError) as exc:  # entries that cannot be right (NaN, complex...)
        raise PredictError(f"{checkpoint}: {error_summary(exc).split(': ', 1)[-1]}") from None
    if not result.ok:
        raise PredictError(f"{checkpoint} does not match {name}: {mismatch_summary(result)}")
    if "step" in meta:
        name += f", segnext.train checkpoint at iteration {meta['step']}"
    elif result.key_family:
        name += f", {result.key_family} key names"
    return model.eval(), name


# ---------------------------------------------------------------------------------------------
# Files

def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise PredictError("segnext.predict reads and writes images with Pillow: "
                           "pip install pillow") from None
    return Image


def check_images(paths: Sequence[Path]) -> None:
    """Fail before any work on a missing file, a non-image or two outputs of the same name."""
    Image = _pil()
    stems = {}
    for path in paths:
        if not path.exists():
            raise PredictError(f"image not found: {path}")
        if not path.is_file():
            raise PredictError(f"not a file: {path}")
        try:
            with Image.open(path) as img:  # the header says whether it is an image
                problem = image_mode_problem(img)
        except Exception as exc:  # Pillow's UnidentifiedImageError, permissions...
            raise PredictError(f"not an image Pillow can read: {path} "
                               f"({error_summary(exc)})") from None
        if problem:
            raise PredictError(f"cannot use {path}: {problem}")
        if path.stem in stems:
            raise PredictError(f"{stems[path.stem]} and {path} would write the same output "
                               "files; segment them in separate runs")
        stems[path.stem] = path


def write_mask(path: Path, labels: torch.Tensor, colours: torch.Tensor) -> None:
    """A palette PNG of the class map (an RGB PNG beyond 256 classes)."""
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
    Image = _pil()
    height, width, _ = rgb.shape
    Image.frombytes("RGB", (width, height), rgb.contiguous().numpy().tobytes()).save(path)


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
    if args.backend != "auto":
        status = segnext_kernels.available_backends()[args.backend]
        if not status.available:
            raise PredictError(f"--backend {args.backend} is not available here: "
                               f"{status.reason}")
    device = parse_device(args.device, PredictError)
    model, description = load_model(args.checkpoint, args.model, args.num_classes)
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
