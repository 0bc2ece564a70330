"""The official training recipe (docs/model.md#training-recipe): the model as it is trained,
the optimizer, the schedule and the loss.

- ``build_model``: SegNeXt from the run's seed (the same initial weights on every rank),
  ``--pretrained`` weights, SyncBatchNorm under DDP on CUDA, gradient checkpointing of the
  backbone blocks, DistributedDataParallel.
- ``build_optimization``: AdamW (betas 0.9/0.999) over the official parameter groups
  (``segnext.param_groups``), the per-iteration ``warmup_poly`` schedule, and the GradScaler
  (enabled for float16 autocast only).
- ``segmentation_loss``: cross-entropy over all pixels, ignored ones included (mmseg 0.24).
"""
from __future__ import annotations

import functools
import logging
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint as recompute

from ..checkpoint import error_summary, load_checkpoint, mismatch_summary
from ..data import IGNORE_INDEX
from ..model import SegNeXt, build, upsample_logits
from ..mscan import Block
from ..param_groups import param_groups
from .errors import TrainError
from .runtime import Runtime


def checkpoint_backbone_blocks(model: SegNeXt) -> int:
    """Make every backbone ``Block`` recompute its activations in backward
    (``torch.utils.checkpoint``, non-reentrant) instead of keeping them. The blocks keep their
    names and parameters: only their instance's ``forward`` is wrapped. Returns the count."""
    def recomputed(forward):
        @functools.wraps(forward)
        def run(x):
            if torch.is_grad_enabled():
                return recompute(forward, x, use_reentrant=False)
            return forward(x)
        return run

    blocks = [m for m in model.backbone.modules() if isinstance(m, Block)]
    for block in blocks:
        block.forward = recomputed(block.forward)
    return len(blocks)


def warmup_poly(iters: int, warmup_iters: int, warmup_ratio: float, power: float,
                base_lr: float, min_lr: float):
    """The lr factor of iteration i (mmcv's PolyLrUpdaterHook with linear warmup):
    poly(i) = (1 - min_lr/base) (1 - i/iters)^power + min_lr/base, and during the warmup
    poly(i) (1 - (1 - i/warmup_iters)(1 - warmup_ratio))."""
    min_factor = min_lr / base_lr if base_lr > 0 else 0.0

    def factor(i: int) -> float:
        progress = min(i, iters) / iters
        poly = (1 - min_factor) * (1 - progress) ** power + min_factor
        if i < warmup_iters:
            poly *= 1 - (1 - i / warmup_iters) * (1 - warmup_ratio)
        return poly
    return factor


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits upsampled to the label size, in float32, ignore index 255,
    averaged over all pixels, ignored ones included (mmseg 0.24's avg_non_ignore=False)."""
    logits = upsample_logits(logits.float(), labels.shape[-2:])
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX,
                           reduction="sum") / labels.numel()


def load_pretrained(model: SegNeXt, path: str, model_name: str,
                    logger: logging.Logger) -> None:
    """Load an ImageNet MSCAN (into the backbone) or a full SegNeXt checkpoint. Only the
    classifier ``decode_head.conv_seg`` may differ (another class count: fine-tuning); it then
    keeps its initialisation. Anything else that does not fit is an error."""
    try:
        loaded = load_checkpoint(model, path, strict=False)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise TrainError(f"--pretrained {path}: {error_summary(exc)}") from None
    classifier = [key for key, _, _ in loaded.mismatched_keys
                  if key.startswith("decode_head.conv_seg.")]
    if loaded.missing_keys or loaded.unexpected_keys or \
            len(classifier) < len(loaded.mismatched_keys):
        raise TrainError(f"--pretrained {path} does not fit {model_name}: "
                         f"{mismatch_summary(loaded)}")
    logger.info(f"loaded {path} into the {loaded.target} "
                f"({loaded.key_family or 'no MLP'} key family)")
    if classifier:
        logger.info(f"  decode_head.conv_seg not loaded: the checkpoint has "
                    f"{loaded.mismatched_keys[0][1][0]} classes, this model "
                    f"{model.decode_head.num_classes}; it keeps its initialisation")


def build_model(args, rt: Runtime, logger: logging.Logger, resuming: bool
                ) -> Tuple[SegNeXt, nn.Module]:
    """(the model, the module that trains it: the model itself or its DDP wrapper), on
    ``rt.device``. ``--pretrained`` is not loaded when ``resuming``."""
    device = rt.device
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build(args.model, args.num_classes, nmf_kwargs=dict(grad=args.nmf_grad))
    if args.pretrained and resuming:
        logger.info(f"resuming: --pretrained {args.pretrained} is not loaded")
    elif args.pretrained:
        load_pretrained(model, args.pretrained, f"SegNeXt-{args.model.upper()}", logger)
    if rt.distributed:
        if device.type == "cuda" and args.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            logger.info("BatchNorm -> SyncBatchNorm")
        else:
            why = ("--no-sync-bn" if device.type == "cuda" else
                   "PyTorch's SyncBatchNorm needs CUDA, it does not run on the CPU with gloo")
            logger.info(f"keeping per-process BatchNorm ({why}); running statistics are "
                        "averaged over the processes before evaluation and checkpoints")
    if args.grad_checkpoint:
        logger.info(f"gradient checkpointing: {checkpoint_backbone_blocks(model)} backbone "
                    "blocks recomputed in backward")
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    trained = DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None) if rt.distributed \
        else model
    return model, trained


def build_optimization(model: nn.Module, args, device: torch.device,
                       amp_dtype: Optional[torch.dtype]):
    """(optimizer, scheduler, GradScaler) of the official recipe."""
    optimizer = torch.optim.AdamW(param_groups(model, args.lr, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_poly(
        args.iters, args.warmup_iters, args.warmup_ratio, args.power, args.lr, args.min_lr))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    return optimizer, scheduler, scaler
