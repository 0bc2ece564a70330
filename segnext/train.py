"""``python -m segnext.train``: train SegNeXt-T/S/B/L, on one process or under ``torchrun``.

    python -m segnext.train --model t --out runs/shapes               # built-in synthetic data
    python -m segnext.train --data ade20k --data-root ADEChallengeData2016 \\
        --pretrained mscan_t.pth --out runs/ade_t
    torchrun --nproc_per_node 8 -m segnext.train --data ade20k --data-root ... --batch-size 2

The recipe is the official one (docs/model.md#training-recipe): AdamW (betas 0.9/0.999, weight
decay 0.01) with the official parameter groups (``segnext.param_groups``: head lr x10, no decay
on the backbone norms), per-iteration linear warmup (ratio 1e-6) then poly decay (power 1),
cross-entropy with ignore index 255 averaged over all pixels, mIoU evaluation. Options: mixed
precision (``--amp bf16|fp16``; fp16 with a GradScaler, meant for CUDA), gradient checkpointing of
the backbone blocks (``--grad-checkpoint``), the kernel backend (``--backend``).

Under torchrun the model runs in DistributedDataParallel (nccl on CUDA, gloo on the CPU), each
process takes its slice of every global batch, BatchNorm becomes SyncBatchNorm on CUDA, and
rank 0 logs and saves. ``--batch-size`` is per process.

The data stream is a function of (seed, step): each step's global batch comes from a seeded
permutation of the dataset and each sample's augmentation from its own seed. A checkpoint holds
the model, optimizer, scheduler, GradScaler and every rank's RNG state, so ``--resume`` continues
the run exactly where it stopped. Checkpoints keep the model weights under ``state_dict`` with the
official key names, so ``segnext.load_checkpoint`` and ``segnext.predict`` read them directly.

This module is the command line; the parts of a run are in ``segnext.training`` (the
processes, the recipe, the loaders, training checkpoints, evaluation, the non-finite checks and
the loop), and their public names are importable from here too.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

import segnext_kernels

from ._cli import ArgumentParser, check_backend
from .checkpoint import error_summary
from .data import IGNORE_INDEX, DataError
from .param_groups import OFFICIAL_CUSTOM_KEYS
from .training.errors import TrainError
from .training.evaluation import evaluate
from .training.finite import non_finite_state
from .training.loaders import SYNTHETIC_DATA_SEED, SeededSamples, StepBatchSampler, build_datasets
from .training.loop import TrainingRun, TrainResult, run_training
from .training.recipe import (build_model, build_optimization, checkpoint_backbone_blocks,
                              load_pretrained, segmentation_loss, warmup_poly)
from .training.runtime import (Runtime, average_batchnorm_statistics, close_logger, init_runtime,
                               make_logger)
from .training.state import (CHECKPOINT_FORMAT, LATEST, TRAINING_STATE, read_training_checkpoint,
                             restore_training_state, resume_path, save_checkpoint)

__all__ = [
    "parse_args", "train", "main", "TrainError", "TrainResult", "DATA_DEFAULTS", "AMP_DTYPES",
    "MAX_SEED",
    # the parts of a run, from segnext.training
    "Runtime", "init_runtime", "average_batchnorm_statistics", "checkpoint_backbone_blocks",
    "warmup_poly", "segmentation_loss", "load_pretrained", "build_model", "build_optimization",
    "StepBatchSampler", "SeededSamples", "build_datasets", "SYNTHETIC_DATA_SEED", "evaluate",
    "non_finite_state", "CHECKPOINT_FORMAT", "LATEST", "TRAINING_STATE", "save_checkpoint",
    "resume_path", "read_training_checkpoint", "restore_training_state", "TrainingRun",
    "run_training",
]

# Defaults that depend on the data. ADE20K: the official schedule (mmseg 1.x: 1 GPU x 16).
# Synthetic: a short run that learns the shapes from scratch on a CPU; without ImageNet
# weights it needs a larger learning rate than the official fine-tuning one.
DATA_DEFAULTS: Dict[str, dict] = {
    "ade20k": dict(num_classes=150, iters=160_000, batch_size=16, crop=512, lr=6e-5,
                   warmup_iters=1500, eval_every=8000, checkpoint_every=8000),
    "synthetic": dict(num_classes=8, iters=1000, batch_size=8, crop=128, lr=6e-4,
                      warmup_iters=50, eval_every=250, checkpoint_every=250),
}
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit seed


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m segnext.train", error_name="segnext.train",
        description="Train SegNeXt (official recipe) on synthetic shapes or ADE20K.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="t", choices=("t", "s", "b", "l"), help="SegNeXt size")
    p.add_argument("--data", default="synthetic", choices=tuple(DATA_DEFAULTS),
                   help="synthetic: built-in generated shapes; ade20k: a folder, see --data-root")
    p.add_argument("--data-root", help="ADE20K folder with images/ and annotations/")
    p.add_argument("--num-classes", type=int, help="default: 150 (ade20k), 8 (synthetic)")
    p.add_argument("--iters", type=int, help="training iterations (default: 160000 for "
                   "ade20k, 1000 for synthetic)")
    p.add_argument("--batch-size", type=int, help="images per process per iteration "
                   "(default: 16 for ade20k, 8 for synthetic)")
    p.add_argument("--crop", type=int, help="training crop size (default: 512 for ade20k, "
                   "128 for synthetic)")
    p.add_argument("--lr", type=float, help="base learning rate, x10 for the head "
                   "(default: 6e-5 for ade20k, 6e-4 for synthetic)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-iters", type=int, help="default: 1500 (ade20k), 50 (synthetic)")
    p.add_argument("--warmup-ratio", type=float, default=1e-6,
                   help="learning rate factor at iteration 0 of the warmup")
    p.add_argument("--power", type=float, default=1.0, help="poly decay power")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--amp", default="none", choices=tuple(AMP_DTYPES),
                   help="autocast dtype; fp16 adds a GradScaler (for CUDA: on the CPU it runs, but slower "
                        "than bf16)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute the backbone blocks in backward instead of storing them")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="SyncBatchNorm when training on several CUDA GPUs")
    p.add_argument("--nmf-grad", default="unrolled", choices=("unrolled", "one_step"),
                   help="NMF gradient: through every iteration (official) or one step")
    p.add_argument("--pretrained", help="checkpoint to start from: an ImageNet MSCAN "
                   "(backbone only) or a full SegNeXt checkpoint")
    p.add_argument("--backend", default="auto",
                   choices=("auto",) + segnext_kernels.backends.BACKENDS,
                   help="segnext_kernels backend for MSCA and NMF")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="data loader processes per rank")
    p.add_argument("--out", help="folder for logs and checkpoints "
                   "(default: work_dirs/segnext_<model>_<data>)")
    p.add_argument("--resume", help="checkpoint to continue from, or 'auto' for "
                   "<out>/latest.pth when it exists")
    p.add_argument("--log-every", type=int, default=50, help="iterations per log line")
    p.add_argument("--eval-every", type=int, help="iterations between mIoU evaluations, "
                   "0 = never (default: 8000 for ade20k, 250 for synthetic)")
    p.add_argument("--checkpoint-every", type=int, help="iterations between checkpoints; one "
                   "is always written at the end (default: as --eval-every)")
    p.add_argument("--synthetic-train-size", type=int, default=2000)
    p.add_argument("--synthetic-val-size", type=int, default=64)
    p.add_argument("--dump-weights", help="at the end, every rank writes its model's "
                   "state_dict to DIR/rank<r>.pt (to check that ranks agree)")
    args = p.parse_args(argv)
    for name, value in DATA_DEFAULTS[args.data].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = os.path.join("work_dirs", f"segnext_{args.model}_{args.data}")
    for name in ("iters", "batch_size", "crop", "num_classes", "log_every",
                 "synthetic_train_size", "synthetic_val_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_iters", "eval_every", "checkpoint_every", "workers"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.num_classes >= IGNORE_INDEX + 1:
        p.error(f"--num-classes must be <= {IGNORE_INDEX}, got {args.num_classes}: label "
                f"{IGNORE_INDEX} marks ignored pixels, so class {IGNORE_INDEX} would never be "
                "trained or evaluated")
    if args.data == "synthetic" and args.num_classes < 2:
        p.error(f"--num-classes must be >= 2 with --data synthetic (the background and at "
                f"least one shape class), got {args.num_classes}")
    # Optimizer and schedule: finite, and in the range where the recipe means something.
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if not (math.isfinite(args.min_lr) and 0 <= args.min_lr <= args.lr):
        p.error(f"--min-lr must be in [0, --lr] = [0, {args.lr}], got {args.min_lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        p.error(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    # AdamW steps in float32: the head's learning rate and its decay must be float32 numbers.
    head_lr = args.lr * OFFICIAL_CUSTOM_KEYS["head"]["lr_mult"]
    if head_lr * max(1.0, args.weight_decay) > torch.finfo(torch.float32).max:
        p.error(f"--lr {args.lr} (x10 for the head) with --weight-decay {args.weight_decay} "
                "overflows float32")
    if not (math.isfinite(args.warmup_ratio) and 0 <= args.warmup_ratio <= 1):
        p.error(f"--warmup-ratio must be in [0, 1], got {args.warmup_ratio}")
    if not (math.isfinite(args.power) and args.power >= 0):
        p.error(f"--power must be a finite number >= 0, got {args.power}")
    if not 0 <= args.seed <= MAX_SEED:
        p.error(f"--seed must be in [0, 2**64 - 1], got {args.seed}")
    for name in ("out", "dump_weights"):
        folder = getattr(args, name)
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            p.error(f"--{name.replace('_', '-')} must be a folder, but {folder} is a file")
    if args.data == "ade20k" and not args.data_root:
        p.error("--data ade20k needs --data-root")
    return args


def train(args: argparse.Namespace) -> TrainResult:
    """Run (or continue) the training described by ``args`` (see ``parse_args``)."""
    amp_dtype = AMP_DTYPES[args.amp]
    check_backend(args.backend, TrainError)
    rt = init_runtime(args.device)
    logger = None
    try:
        out_dir = Path(args.out)
        try:
            if rt.is_main:
                out_dir.mkdir(parents=True, exist_ok=True)
            logger = make_logger(rt, out_dir)
        except OSError as exc:
            raise TrainError(f"cannot write to the --out folder {out_dir}: "
                             f"{exc.strerror or error_summary(exc)}") from None
        if amp_dtype is torch.float16 and rt.device.type != "cuda":
            # Allowed (it is how the GradScaler path gets tested without a GPU), but slow.
            logger.warning("--amp fp16 on the CPU runs slower than --amp bf16 "
                           "(the CPU has no fast float16 arithmetic); prefer bf16 here")
        with segnext_kernels.use_backend(args.backend):
            return run_training(args, rt, amp_dtype, out_dir, logger)
    except DataError as exc:  # raised in a loader worker, its message ends with ours
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise TrainError(lines[-1].split("DataError: ", 1)[-1] if lines else "bad data") \
            from None
    finally:
        if logger is not None:
            close_logger(logger)
        if rt.distributed:
            dist.destroy_process_group()


def main(argv: Optional[Sequence[str]] = None) -> TrainResult:
    args = parse_args(argv)
    try:
        return train(args)
    except TrainError as exc:
        print(f"segnext.train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
