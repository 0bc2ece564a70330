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

from .checkpoint import load_checkpoint
from .data import ADE20K, IGNORE_INDEX, SyntheticShapes, derive_seed
from .metrics import ConfusionMatrix, SegmentationScores
from .model import SegNeXt, build, upsample_logits
from .mscan import Block
from .param_groups import param_groups
from .predict import error_summary, mismatch_summary, whole_inference

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
    p = argparse.ArgumentParser(
        prog="python -m segnext.train",
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
    for name in ("iters", "batch_size", "crop", "num_classes", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("warmup_iters", "eval_every", "checkpoint_every", "workers"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
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
    try:
        device = torch.device(device_name)
    except RuntimeError as exc:
        raise TrainError(f"bad --device {device_name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda, but no CUDA GPU is visible to PyTorch")
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"--device must be cpu or cuda, got {device_name!r}")
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
    torch.save(payload, tmp)
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
        raise TrainError(f"--resume: checkpoint not found: {path}")
    return path


def _read_training_checkpoint(path: Path, args) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: report it in one line
        raise TrainError(f"--resume: cannot read {path}: {error_summary(exc)}") from None
    meta = ckpt.get("meta", {}) if isinstance(ckpt, dict) else {}
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"--resume: {path} is not a segnext.train checkpoint (to start from "
                         "other weights, use --pretrained)")
    for name in ("model", "num_classes"):
        if meta[name] != getattr(args, name):
            raise TrainError(f"--resume: {path} was trained with --{name.replace('_', '-')} "
                             f"{meta[name]}, this run has {getattr(args, name)}")
    return ckpt


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
        if rt.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        logger = _make_logger(rt, out_dir)
        if amp_dtype is torch.float16 and rt.device.type != "cuda":
            # Allowed (it is how the GradScaler path gets tested without a GPU), but slow.
            logger.warning("--amp fp16 on the CPU runs about 2x slower than --amp bf16 "
                           "(the CPU has no fast float16 arithmetic); prefer bf16 here")
        with segnext_kernels.use_backend(args.backend):
            return _train(args, rt, amp_dtype, out_dir, logger)
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
        model.load_state_dict(resumed["state_dict"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["grad_scaler"])
        start_step = int(resumed["meta"]["step"])
        rng_states = resumed["rng_states"]
        if len(rng_states) == rt.world_size:
            _set_rng_state(rng_states[rt.rank], device)
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

    def run_evaluation(step: int) -> None:
        average_batchnorm_statistics(model, rt)
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
                raise TrainError(f"the loss is {mean_loss} at iteration {step}")
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
        dump_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), dump_dir / f"rank{rt.rank}.pt")
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
