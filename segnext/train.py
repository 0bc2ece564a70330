"""``python -m segnext.train``: train SegNeXt-T/S/B/L, on one process or under ``torchrun``.

    python -m segnext.train --model t --out runs/shapes               # built-in synthetic data
    python -m segnext.train --data ade20k --data-root ADEChallengeData2016 \\
        --pretrained mscan_t.pth --out runs/ade_t
    torchrun --nproc_per_node 8 -m segnext.train --data ade20k --data-root ... --batch-size 2

The recipe is the official one (architecture reference §6): AdamW (betas 0.9/0.999, weight
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
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint as recompute
from torch.utils.data import DataLoader, Dataset, Sampler

import segnext_kernels
from segnext_kernels import backends as kernel_backends

from ._cli import ArgumentParser, parse_device
from .checkpoint import error_summary, load_checkpoint, mismatch_summary, read_checkpoint
from .data import ADE20K, IGNORE_INDEX, DataError, SyntheticShapes, derive_seed
from .metrics import ConfusionMatrix, SegmentationScores
from .model import SegNeXt, build, upsample_logits
from .mscan import Block
from .param_groups import OFFICIAL_CUSTOM_KEYS, param_groups
from .inference import whole_inference

CHECKPOINT_FORMAT = "segnext.train/1"
LATEST = "latest.pth"
SYNTHETIC_DATA_SEED = 0  # the synthetic dataset is one fixed dataset; --seed drives the run

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
# What --resume needs of a checkpoint besides the weights, with the type each entry must have.
TRAINING_STATE = {"optimizer": dict, "scheduler": dict, "grad_scaler": dict, "rng_states": list}


class TrainError(Exception):
    """A problem with the command line, the data or a checkpoint: reported in one line."""


@dataclass
class TrainResult:
    """What a run did: the final step, the mean loss of each logging window as (step, loss),
    the learning rate of each parameter group for the next step, the evaluations as
    (step, scores), and the last checkpoint written (None if none)."""
    step: int
    losses: List[Tuple[int, float]] = field(default_factory=list)
    lrs: List[float] = field(default_factory=list)
    evaluations: List[Tuple[int, SegmentationScores]] = field(default_factory=list)
    checkpoint: Optional[Path] = None
    kernels: Dict[str, int] = field(default_factory=dict)  # "op:backend" -> calls, first step


# ---------------------------------------------------------------------------------------------
# Command line

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
                   help="autocast dtype; fp16 adds a GradScaler (for CUDA: on the CPU it runs, ~2x slower than bf16)")
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


# ---------------------------------------------------------------------------------------------
# Processes and devices

@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(device_name: str) -> Runtime:
    """One process, or this process's place in a torchrun job (process group initialised)."""
    device = parse_device(device_name, TrainError)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Runtime(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, world_size, device)


def _gather(obj, rt: Runtime) -> list:
    if not rt.distributed:
        return [obj]
    gathered = [None] * rt.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def _make_logger(rt: Runtime, out_dir: Path) -> logging.Logger:
    logger = logging.getLogger("segnext.train")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    logger.setLevel(logging.INFO if rt.is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if rt.is_main:
        handlers.append(logging.FileHandler(out_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def _close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


# ---------------------------------------------------------------------------------------------
# Model, schedule, loss

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


@torch.no_grad()
def non_finite_state(model: nn.Module) -> List[str]:
    """Names of the model's floating-point parameters and buffers that hold NaN or infinity
    (one host sync for the whole model)."""
    named = [(name, t) for name, t in itertools.chain(model.named_parameters(),
                                                       model.named_buffers())
             if t.is_floating_point() and t.numel()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def average_batchnorm_statistics(model: nn.Module, rt: Runtime) -> None:
    """Average the BN running statistics over the ranks (without SyncBatchNorm each rank
    tracks its own), so that evaluation and checkpoints see the same model on every rank."""
    if not rt.distributed:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for stat in (module.running_mean, module.running_var):
                dist.all_reduce(stat, op=dist.ReduceOp.SUM)
                stat.div_(rt.world_size)


# ---------------------------------------------------------------------------------------------
# Data

class StepBatchSampler(Sampler):
    """The batches of steps [start_step, total_steps) for one rank.

    Epoch e is a permutation of the dataset seeded by (seed, e), cut into global batches of
    ``batch_size * world_size`` (the remainder dropped); rank r takes the r-th slice of each.
    Every item is (index, augmentation seed), so the stream depends only on (seed, step): a
    resumed run gets exactly the batches the uninterrupted one would have.
    """

    def __init__(self, dataset_size: int, batch_size: int, world_size: int, rank: int,
                 seed: int, start_step: int, total_steps: int):
        global_batch = batch_size * world_size
        if dataset_size < global_batch:
            raise TrainError(f"the training set has {dataset_size} samples, fewer than one "
                             f"global batch ({batch_size} x {world_size} processes)")
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.dataset_size, self.seed = dataset_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.steps_per_epoch = dataset_size // global_batch

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        epoch, order = None, None
        for step in range(self.start_step, self.total_steps):
            step_epoch, position = divmod(step, self.steps_per_epoch)
            if step_epoch != epoch:
                epoch = step_epoch
                generator = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
                order = torch.randperm(self.dataset_size, generator=generator).tolist()
            first = (position * self.world_size + self.rank) * self.batch_size
            yield [(order[first + j], derive_seed("augment", self.seed, step, first + j))
                   for j in range(self.batch_size)]


class SeededSamples(Dataset):
    """``dataset.sample(index, generator)`` for (index, seed) keys."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        index, seed = key
        return self.dataset.sample(index, torch.Generator().manual_seed(seed))


def build_datasets(args) -> Tuple[Dataset, Dataset]:
    if args.data == "synthetic":
        common = dict(num_classes=args.num_classes, size=args.crop, seed=SYNTHETIC_DATA_SEED)
        return (SyntheticShapes(length=args.synthetic_train_size, split="train", **common),
                SyntheticShapes(length=args.synthetic_val_size, split="val", **common))
    if args.num_classes != ADE20K.num_classes:
        raise TrainError(f"ADE20K has {ADE20K.num_classes} classes; got --num-classes "
                         f"{args.num_classes}")
    try:
        return (ADE20K(args.data_root, "training", crop_size=args.crop),
                ADE20K(args.data_root, "validation"))
    except FileNotFoundError as exc:
        raise TrainError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model: SegNeXt, loader: DataLoader, num_classes: int, device: torch.device,
             seed: int, amp_dtype: Optional[torch.dtype] = None) -> SegmentationScores:
    """mIoU over ``loader`` (whole-image inference, logits resized to the label size), summed
    over all ranks. The NMF bases come from a generator seeded with ``seed``, so the result is
    reproducible and the global RNG of the training run is left alone."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device).manual_seed(derive_seed("eval", seed))
    confusion = ConfusionMatrix(num_classes, device=device)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = whole_inference(model, images, labels.shape[-2:], generator=generator)
        confusion.update(logits.argmax(dim=1), labels)
    confusion.all_reduce()
    model.train(was_training)
    return confusion.compute()


# ---------------------------------------------------------------------------------------------
# Checkpoints

def _rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically (a reader never sees half a file), then point latest.pth at it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
    except (OSError, RuntimeError) as exc:  # a full disk, a folder removed under the run
        tmp.unlink(missing_ok=True)  # the last checkpoint written stays as it was
        raise TrainError(f"cannot write the checkpoint {path}: {error_summary(exc)}") from None
    os.replace(tmp, path)
    latest = path.with_name(LATEST)
    latest_tmp = path.with_name(LATEST + ".tmp")
    try:
        if latest_tmp.exists():
            latest_tmp.unlink()
        os.link(path, latest_tmp)  # a hard link: no second copy on disk
    except OSError:
        shutil.copyfile(path, latest_tmp)
    os.replace(latest_tmp, latest)


def _resume_path(args, out_dir: Path) -> Optional[Path]:
    if not args.resume:
        return None
    if args.resume == "auto":
        latest = out_dir / LATEST
        return latest if latest.is_file() else None
    path = Path(args.resume)
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise TrainError(f"--resume: checkpoint {what}: {path}")
    return path


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_training_checkpoint(path: Path, args) -> dict:
    """The checkpoint of ``path``, checked to hold everything a resumed run reads (the weights
    are checked when loaded)."""
    try:
        ckpt = read_checkpoint(path, weights_only=True)
    except (OSError, ValueError, TypeError) as exc:  # any unreadable file: one line
        raise TrainError(f"--resume: cannot read {path}: "
                         f"{error_summary(exc).split(': ', 1)[-1]}") from None
    meta = ckpt.get("meta")
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"--resume: {path} is not a segnext.train checkpoint (to start from "
                         "other weights, use --pretrained)")
    problems = [f"no {name!r} entry" for name, kind in
                dict(state_dict=dict, **TRAINING_STATE).items()
                if not isinstance(ckpt.get(name), kind)]
    problems += [f"meta[{name!r}] is {meta.get(name)!r}, expected a count" for name in
                 ("step", "iters") if not _is_count(meta.get(name))]
    if isinstance(ckpt.get("rng_states"), list) and not (ckpt["rng_states"] and all(
            isinstance(s, dict) and isinstance(s.get("torch"), torch.Tensor)
            for s in ckpt["rng_states"])):
        problems.append("its 'rng_states' are not per-process RNG states")
    if problems:
        raise TrainError(f"--resume: {path} is damaged or not a complete training checkpoint: "
                         + "; ".join(problems))
    for name in ("model", "num_classes"):
        if meta.get(name) != getattr(args, name):
            raise TrainError(f"--resume: {path} was trained with --{name.replace('_', '-')} "
                             f"{meta.get(name)}, this run has {getattr(args, name)}")
    return ckpt


def restore_training_state(resumed: dict, path: Path, model: nn.Module, optimizer, scheduler,
                           scaler) -> int:
    """Load a checked training checkpoint into the run's objects; returns its step. The
    weights go through ``load_checkpoint`` (everything validated before anything is copied);
    a part that does not fit this run raises ``TrainError`` naming it."""
    try:
        load_checkpoint(model, resumed["state_dict"], strict=True)
    except (ValueError, TypeError, RuntimeError) as exc:  # CheckpointMismatchError included
        raise TrainError(f"--resume: the weights in {path} do not fit: "
                         f"{error_summary(exc).split(': ', 1)[-1]}") from None
    step = resumed["meta"]["step"]
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler),
                         ("grad_scaler", scaler)):
        try:
            target.load_state_dict(resumed[name])
        except (KeyError, IndexError, ValueError, TypeError, RuntimeError) as exc:
            raise TrainError(f"--resume: the {name} state in {path} does not fit this run: "
                             f"{error_summary(exc)}") from None
    if scheduler.last_epoch != step:  # the schedule counts the steps done
        raise TrainError(f"--resume: {path} is at iteration {step} but its scheduler state at "
                         f"{scheduler.last_epoch!r}; a damaged or hand-edited checkpoint")
    return step


# ---------------------------------------------------------------------------------------------
# Training

def train(args: argparse.Namespace) -> TrainResult:
    """Run (or continue) the training described by ``args`` (see ``parse_args``)."""
    amp_dtype = AMP_DTYPES[args.amp]
    if args.backend != "auto":
        status = segnext_kernels.available_backends()[args.backend]
        if not status.available:
            raise TrainError(f"--backend {args.backend} is not available here: {status.reason}")
    rt = init_runtime(args.device)
    logger = None
    try:
        out_dir = Path(args.out)
        try:
            if rt.is_main:
                out_dir.mkdir(parents=True, exist_ok=True)
            logger = _make_logger(rt, out_dir)
        except OSError as exc:
            raise TrainError(f"cannot write to the --out folder {out_dir}: "
                             f"{exc.strerror or error_summary(exc)}") from None
        if amp_dtype is torch.float16 and rt.device.type != "cuda":
            # Allowed (it is how the GradScaler path gets tested without a GPU), but slow.
            logger.warning("--amp fp16 on the CPU runs about 2x slower than --amp bf16 "
                           "(the CPU has no fast float16 arithmetic); prefer bf16 here")
        with segnext_kernels.use_backend(args.backend):
            return _train(args, rt, amp_dtype, out_dir, logger)
    except DataError as exc:  # raised in a loader worker, its message ends with ours
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise TrainError(lines[-1].split("DataError: ", 1)[-1] if lines else "bad data") \
            from None
    finally:
        if logger is not None:
            _close_logger(logger)
        if rt.distributed:
            dist.destroy_process_group()


def _train(args, rt: Runtime, amp_dtype, out_dir: Path, logger: logging.Logger) -> TrainResult:
    device = rt.device
    if not kernel_backends.runs_on(args.backend, device.type):
        raise TrainError(str(kernel_backends.device_error(args.backend, "the model", device)))
    logger.info(f"SegNeXt-{args.model.upper()}, {args.num_classes} classes, data {args.data}, "
                f"{rt.world_size} process(es) on {device.type}, batch {args.batch_size} per "
                f"process, crop {args.crop}, {args.iters} iterations, amp {args.amp}")
    logger.info(f"kernel backend {args.backend}")

    resume_path = _resume_path(args, out_dir)
    resumed = _read_training_checkpoint(resume_path, args) if resume_path else None
    train_set, val_set = build_datasets(args)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build(args.model, args.num_classes, nmf_kwargs=dict(grad=args.nmf_grad))
    if args.pretrained and resumed is not None:
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

    optimizer = torch.optim.AdamW(param_groups(model, args.lr, args.weight_decay), lr=args.lr,
                                  betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_poly(
        args.iters, args.warmup_iters, args.warmup_ratio, args.power, args.lr, args.min_lr))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)

    start_step = 0
    if resumed is not None:
        start_step = restore_training_state(resumed, resume_path, model, optimizer, scheduler,
                                            scaler)
        rng_states = resumed["rng_states"]
        if len(rng_states) == rt.world_size:
            try:
                _set_rng_state(rng_states[rt.rank], device)
            except (KeyError, TypeError, RuntimeError) as exc:
                raise TrainError(f"--resume: the RNG state in {resume_path} is damaged: "
                                 f"{error_summary(exc)}") from None
        else:
            logger.warning(f"the checkpoint was written by {len(rng_states)} process(es), this "
                           f"run has {rt.world_size}: fresh RNG streams, and a different global "
                           "batch; not an exact continuation")
            torch.manual_seed(derive_seed("train", args.seed, rt.rank, start_step))
        if resumed["meta"]["iters"] != args.iters:
            logger.warning(f"the checkpoint's run had --iters {resumed['meta']['iters']}; "
                           f"the schedule now runs to {args.iters}")
        logger.info(f"resumed from {resume_path} at iteration {start_step}")
    else:
        torch.manual_seed(derive_seed("train", args.seed, rt.rank))

    sampler = StepBatchSampler(len(train_set), args.batch_size, rt.world_size, rt.rank,
                               args.seed, start_step, args.iters)
    # Own generators: creating a loader iterator must not draw from the global RNG, whose
    # state is part of the checkpoint.
    loader_options = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                          generator=torch.Generator())
    train_loader = DataLoader(SeededSamples(train_set), batch_sampler=sampler,
                              persistent_workers=False, **loader_options)
    val_loader = DataLoader(val_set, sampler=list(range(rt.rank, len(val_set), rt.world_size)),
                            batch_size=args.batch_size if args.data == "synthetic" else 1,
                            **loader_options)

    result = TrainResult(step=start_step)

    checked_step = None

    def check_finite(step: int) -> None:
        """Stop before logging, evaluating or saving weights that hold NaN or infinity."""
        nonlocal checked_step
        if checked_step == step:
            return
        checked_step = step
        bad = non_finite_state(model)
        total = len(bad)
        if rt.distributed:  # every rank must stop together
            count = torch.tensor([total], device=device)
            dist.all_reduce(count)
            total = int(count)
        if total:
            shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "") if bad else \
                "on another process"
            kept = (f"the last checkpoint written, {result.checkpoint}, is intact"
                    if result.checkpoint else "no checkpoint was written")
            raise TrainError(f"the weights hold NaN or infinity after iteration {step} "
                             f"({shown}); stopped without saving them ({kept}). A smaller "
                             "--lr or a longer --warmup-iters may help")

    def run_evaluation(step: int) -> None:
        average_batchnorm_statistics(model, rt)
        check_finite(step)
        started = time.perf_counter()
        scores = evaluate(model, val_loader, args.num_classes, device, args.seed, amp_dtype)
        result.evaluations.append((step, scores))
        summary = scores.summary()
        logger.info(f"[eval {step}] " + "  ".join(f"{k} {v:.2f}" for k, v in summary.items())
                    + f"  ({len(val_set)} images, {time.perf_counter() - started:.1f} s)")
        if args.num_classes <= 20:
            logger.info("  IoU per class: " + " ".join(f"{100 * v:.1f}" for v in scores.iou))
        if rt.is_main:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(dict(step=step, **summary)) + "\n")

    def write_checkpoint(step: int) -> None:
        average_batchnorm_statistics(model, rt)
        check_finite(step)
        rng_states = _gather(_rng_state(device), rt)
        if rt.is_main:
            path = out_dir / f"iter_{step}.pth"
            save_checkpoint(path, {
                "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "grad_scaler": scaler.state_dict(),
                "rng_states": rng_states,
                "meta": dict(format=CHECKPOINT_FORMAT, model=args.model,
                             num_classes=args.num_classes, step=step, iters=args.iters,
                             world_size=rt.world_size, torch=str(torch.__version__),
                             args={k: v for k, v in vars(args).items()
                                   if isinstance(v, (str, int, float, bool, type(None)))}),
            })
            result.checkpoint = path
            logger.info(f"saved {path}")

    model.train()
    window_loss = torch.zeros((), device=device)
    window_steps, window_start = 0, time.perf_counter()
    step = start_step
    for index, (images, labels) in zip(range(start_step, args.iters), train_loader):
        step = index + 1  # iterations done once this one is
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        first = index == start_step
        with (segnext_kernels.record_kernels() if first else contextlib.nullcontext()) as ran:
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                logits = trained(images)
            loss = segmentation_loss(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
        if first:
            result.kernels = {f"{op}:{name}": n for (op, name), n in sorted(ran.items())}
            logger.info("kernels of the first step: " + ", ".join(
                f"{k} x{n}" for k, n in result.kernels.items()))
        scaler.step(optimizer)
        scaler.update()
        used_lrs = [group["lr"] for group in optimizer.param_groups]
        with warnings.catch_warnings():
            # The schedule counts iterations, also those whose step the GradScaler skipped
            # (inf/NaN gradients), as mmseg does; torch warns about that first skipped step.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            scheduler.step()
        window_loss += loss.detach()
        window_steps += 1

        if step % args.log_every == 0 or step == args.iters:
            if rt.distributed:
                dist.all_reduce(window_loss)
                window_loss /= rt.world_size
            mean_loss = float(window_loss) / window_steps
            if not math.isfinite(mean_loss):
                raise TrainError(f"the loss is {mean_loss} at iteration {step}; stopped "
                                 "(a smaller --lr or a longer --warmup-iters may help)")
            check_finite(step)
            elapsed = time.perf_counter() - window_start
            speed = window_steps / elapsed
            eta = (args.iters - step) / speed
            memory = (f"  mem {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
                      if device.type == "cuda" else "")
            if scaler.is_enabled():
                memory += f"  loss scale {scaler.get_scale():g}"
            logger.info(f"[{step}/{args.iters}] loss {mean_loss:.4f}  lr {min(used_lrs):.3e} "
                        f"(head {max(used_lrs):.3e})  {speed:.2f} it/s  "
                        f"{speed * args.batch_size * rt.world_size:.1f} img/s  "
                        f"eta {datetime.timedelta(seconds=round(eta))}{memory}")
            result.losses.append((step, mean_loss))
            window_loss.zero_()
            window_steps, window_start = 0, time.perf_counter()
        if args.eval_every and (step % args.eval_every == 0 or step == args.iters):
            run_evaluation(step)
        if (args.checkpoint_every and step % args.checkpoint_every == 0) or step == args.iters:
            write_checkpoint(step)

    result.step = step
    result.lrs = [group["lr"] for group in optimizer.param_groups]
    if args.dump_weights:
        average_batchnorm_statistics(model, rt)
        dump_dir = Path(args.dump_weights)
        try:
            dump_dir.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), dump_dir / f"rank{rt.rank}.pt")
        except OSError as exc:
            raise TrainError(f"cannot write to the --dump-weights folder {dump_dir}: "
                             f"{exc.strerror or error_summary(exc)}") from None
    logger.info(f"done at iteration {step}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> TrainResult:
    args = parse_args(argv)
    try:
        return train(args)
    except TrainError as exc:
        print(f"segnext.train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
