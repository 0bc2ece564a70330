"""The processes of a run: one, or this process's place in a ``torchrun`` job.

``init_runtime`` starts the process group (nccl on CUDA, gloo on the CPU); the helpers here are
the only collective operations of a run besides DistributedDataParallel's own and the
confusion matrix's sum: gathering objects, the mean of a value, a count summed, and the
BatchNorm running statistics averaged (each rank tracks its own without SyncBatchNorm).
``make_logger``: rank 0 logs to the console and ``<out>/train.log``, the others warnings only.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .._cli import parse_device
from .errors import TrainError


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


def gather(obj, rt: Runtime) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not rt.distributed:
        return [obj]
    gathered = [None] * rt.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def mean_over_ranks_(value: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """``value`` replaced in place by its mean over the ranks."""
    if rt.distributed:
        dist.all_reduce(value)
        value /= rt.world_size
    return value


def sum_over_ranks(count: int, rt: Runtime) -> int:
    """The sum of an int over the ranks."""
    if not rt.distributed:
        return count
    total = torch.tensor([count], device=rt.device)
    dist.all_reduce(total)
    return int(total)


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


def make_logger(rt: Runtime, out_dir: Path) -> logging.Logger:
    """The ``segnext.train`` logger: info on rank 0 (console and ``out_dir/train.log``),
    warnings only on the other ranks."""
    logger = logging.getLogger("segnext.train")
    close_logger(logger)
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


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
