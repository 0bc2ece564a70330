"""The SegNeXt a checkpoint file holds, for the command lines (``segnext.predict``,
``segnext.export``).

``load_model`` reads the file, tells the model size and class count (from ``meta`` of a
``segnext.train`` checkpoint, else from the weights: ``infer_model_size`` and the classifier's
shape), builds the model and loads the weights. Every problem is a ``CheckpointFileError`` whose
message is one line naming the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from .checkpoint import (error_summary, load_checkpoint, mismatch_summary, plain_state_dict,
                         read_checkpoint)
from .model import SegNeXt, build
from .mscan import MSCAN_SETTINGS


class CheckpointFileError(ValueError):
    """A checkpoint file that does not give a SegNeXt; the message is one line."""


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


def load_model(checkpoint: Path, model_size: Optional[str], num_classes: Optional[int]
               ) -> Tuple[SegNeXt, str]:
    """The SegNeXt of ``checkpoint`` (eval mode, on the CPU) and a description of it;
    ``model_size`` / ``num_classes`` None are read from the checkpoint."""
    if not checkpoint.is_file():
        what = "is not a file" if checkpoint.exists() else "not found"
        raise CheckpointFileError(f"checkpoint {what}: {checkpoint}")
    try:
        ckpt = read_checkpoint(checkpoint, weights_only=True)
        state = plain_state_dict(ckpt)
    except (OSError, ValueError, TypeError) as exc:  # one line naming the file
        message = error_summary(exc).split(": ", 1)[-1]
        if not message.startswith("cannot read checkpoint"):
            message = f"cannot read checkpoint {checkpoint} (is it a PyTorch checkpoint?): " \
                      f"{error_summary(exc)}"
        raise CheckpointFileError(message) from None
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    if not any(key.startswith(("backbone.", "decode_head.")) for key in state) and \
            any(key.startswith("patch_embed1.") for key in state):
        raise CheckpointFileError(f"{checkpoint} holds backbone weights only (an ImageNet "
                                  "MSCAN checkpoint?); prediction needs a full SegNeXt "
                                  "checkpoint")

    if model_size is None and "model" in meta:
        model_size = meta["model"]
        if model_size not in MSCAN_SETTINGS:
            raise CheckpointFileError(f"{checkpoint} names its model {model_size!r} (meta), "
                                      "expected one of t, s, b, l; pass --model")
    model_size = model_size or infer_model_size(state)
    if model_size is None:
        raise CheckpointFileError(f"cannot tell the model size from {checkpoint} (is it a "
                                  "SegNeXt checkpoint?); pass --model t|s|b|l")
    if num_classes is None and "num_classes" in meta:
        num_classes = meta["num_classes"]
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise CheckpointFileError(f"{checkpoint} gives its class count as {num_classes!r} "
                                      "(meta), expected an int >= 1; pass --num-classes")
    if num_classes is None and "decode_head.conv_seg.weight" in state:
        num_classes = int(state["decode_head.conv_seg.weight"].shape[0])
    if num_classes is None:
        raise CheckpointFileError(f"cannot tell the class count from {checkpoint}; "
                                  "pass --num-classes")

    name = f"SegNeXt-{model_size.upper()} with {num_classes} classes"
    try:
        model = build(model_size, num_classes)
    except (RuntimeError, MemoryError) as exc:  # e.g. a --num-classes too large to allocate
        raise CheckpointFileError(f"cannot build {name}: {error_summary(exc)}") from None
    try:
        result = load_checkpoint(model, ckpt, strict=False)
    except (ValueError, TypeError) as exc:  # entries that cannot be right (NaN, complex...)
        raise CheckpointFileError(f"{checkpoint}: {error_summary(exc).split(': ', 1)[-1]}") \
            from None
    if not result.ok:
        raise CheckpointFileError(f"{checkpoint} does not match {name}: "
                                  f"{mismatch_summary(result)}")
    if "step" in meta:
        name += f", segnext.train checkpoint at iteration {meta['step']}"
    elif result.key_family:
        name += f", {result.key_family} key names"
    return model.eval(), name
