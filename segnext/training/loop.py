"""The training loop of ``segnext.train``, read top to bottom in ``TrainingRun.run``:

1. set up: the ``--resume`` checkpoint, checked before anything else; the datasets; the model,
   optimizer, schedule and GradScaler; the restored training state and RNG streams (or fresh
   ones); the loaders of the remaining steps;
2. every iteration, ``step``: forward under autocast, loss, backward through the GradScaler,
   optimizer and schedule steps; the first one records which kernels ran;
3. every ``--log-every`` iterations, ``log``: the window's mean loss over the ranks, speed and
   time left, once the loss and the weights are checked to be finite;
4. every ``--eval-every`` iterations, ``evaluate``, and every ``--checkpoint-every`` and at the
   end, ``save``: both after the BatchNorm statistics are averaged over the ranks and the
   weights checked.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import segnext_kernels
from segnext_kernels import backends as kernel_backends

from ..checkpoint import error_summary
from ..data import derive_seed
from ..metrics import SegmentationScores
from .errors import TrainError
from .evaluation import evaluate
from .finite import WeightsCheck, check_loss
from .loaders import build_datasets, build_loaders
from .recipe import build_model, build_optimization, segmentation_loss
from .runtime import Runtime, average_batchnorm_statistics, gather, mean_over_ranks_
from .state import (read_training_checkpoint, restore_rng_streams, restore_training_state,
                    resume_path, rng_state, save_checkpoint, training_checkpoint)


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


class LogWindow:
    """The iterations since the last log line: their loss summed on the device (no host sync
    per step), their count and when the window started."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.steps, self.started = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss.detach()
        self.steps += 1

    def mean_loss(self, rt: Runtime) -> float:
        """The mean loss of the window over every rank's iterations."""
        return float(mean_over_ranks_(self.loss, rt)) / self.steps

    def reset(self) -> None:
        self.loss.zero_()
        self.steps, self.started = 0, time.perf_counter()


def run_training(args, rt: Runtime, amp_dtype: Optional[torch.dtype], out_dir: Path,
                 logger: logging.Logger) -> TrainResult:
    """Run (or continue) the training of ``args`` on this process's part of ``rt``."""
    return TrainingRun(args, rt, amp_dtype, out_dir, logger).run()


class TrainingRun:
    """One run's objects and the loop over its steps."""

    def __init__(self, args, rt: Runtime, amp_dtype: Optional[torch.dtype], out_dir: Path,
                 logger: logging.Logger):
        self.args, self.rt, self.amp_dtype = args, rt, amp_dtype
        self.out_dir, self.logger = out_dir, logger
        self.device = rt.device

    def run(self) -> TrainResult:
        args = self.args
        self.set_up()
        self.model.train()
        window = LogWindow(self.device)
        step = self.start_step
        for index, (images, labels) in zip(range(self.start_step, args.iters),
                                           self.train_loader):
            step = index + 1  # iterations done once this one is
            loss, used_lrs = self.step(images, labels, record_kernels=index == self.start_step)
            window.add(loss)
            if step % args.log_every == 0 or step == args.iters:
                self.log(step, window, used_lrs)
            if args.eval_every and (step % args.eval_every == 0 or step == args.iters):
                self.evaluate(step)
            if (args.checkpoint_every and step % args.checkpoint_every == 0) or \
                    step == args.iters:
                self.save(step)

        self.result.step = step
        self.result.lrs = [group["lr"] for group in self.optimizer.param_groups]
        if args.dump_weights:
            self.dump_weights()
        self.logger.info(f"done at iteration {step}")
        return self.result

    # -- 1. set up ----------------------------------------------------------------------------

    def set_up(self) -> None:
        args, rt, device, logger = self.args, self.rt, self.device, self.logger
        if not kernel_backends.runs_on(args.backend, device.type):
            raise TrainError(str(kernel_backends.device_error(args.backend, "the model",
                                                              device)))
        logger.info(f"SegNeXt-{args.model.upper()}, {args.num_classes} classes, data "
                    f"{args.data}, {rt.world_size} process(es) on {device.type}, batch "
                    f"{args.batch_size} per process, crop {args.crop}, {args.iters} "
                    f"iterations, amp {args.amp}")
        logger.info(f"kernel backend {args.backend}")

        path = resume_path(args, self.out_dir)
        resumed = read_training_checkpoint(path, args) if path else None
        self.train_set, self.val_set = build_datasets(args)
        self.model, self.trained = build_model(args, rt, logger, resuming=resumed is not None)
        self.optimizer, self.scheduler, self.scaler = build_optimization(
            self.model, args, device, self.amp_dtype)

        if resumed is not None:
            self.start_step = restore_training_state(resumed, path, self.model, self.optimizer,
                                                     self.scheduler, self.scaler)
            restore_rng_streams(resumed, path, rt, args.seed, self.start_step, logger)
            if resumed["meta"]["iters"] != args.iters:
                logger.warning(f"the checkpoint's run had --iters {resumed['meta']['iters']}; "
                               f"the schedule now runs to {args.iters}")
            logger.info(f"resumed from {path} at iteration {self.start_step}")
        else:
            self.start_step = 0
            torch.manual_seed(derive_seed("train", args.seed, rt.rank))

        self.train_loader, self.val_loader = build_loaders(args, rt, self.train_set,
                                                           self.val_set, self.start_step)
        self.result = TrainResult(step=self.start_step)
        self.weights = WeightsCheck(self.model, rt)

    # -- 2. one iteration ---------------------------------------------------------------------

    def step(self, images: torch.Tensor, labels: torch.Tensor, record_kernels: bool
             ) -> Tuple[torch.Tensor, List[float]]:
        """One optimizer step; returns its loss and the learning rates it used."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        amp_dtype = self.amp_dtype
        with (segnext_kernels.record_kernels() if record_kernels else
              contextlib.nullcontext()) as ran:
            with torch.autocast(self.device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                logits = self.trained(images)
            loss = segmentation_loss(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        if record_kernels:
            self.result.kernels = {f"{op}:{name}": n for (op, name), n in sorted(ran.items())}
            self.logger.info("kernels of the first step: " + ", ".join(
                f"{k} x{n}" for k, n in self.result.kernels.items()))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        used_lrs = [group["lr"] for group in self.optimizer.param_groups]
        with warnings.catch_warnings():
            # The schedule counts iterations, also those whose step the GradScaler skipped
            # (inf/NaN gradients), as mmseg does; torch warns about that first skipped step.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        return loss, used_lrs

    # -- 3. the log line ----------------------------------------------------------------------

    def log(self, step: int, window: LogWindow, used_lrs: List[float]) -> None:
        args, device = self.args, self.device
        mean_loss = window.mean_loss(self.rt)
        check_loss(mean_loss, step)
        self.weights.check(step, self.result.checkpoint)
        speed = window.steps / (time.perf_counter() - window.started)
        eta = (args.iters - step) / speed
        memory = (f"  mem {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
                  if device.type == "cuda" else "")
        if self.scaler.is_enabled():
            memory += f"  loss scale {self.scaler.get_scale():g}"
        self.logger.info(f"[{step}/{args.iters}] loss {mean_loss:.4f}  lr {min(used_lrs):.3e} "
                         f"(head {max(used_lrs):.3e})  {speed:.2f} it/s  "
                         f"{speed * args.batch_size * self.rt.world_size:.1f} img/s  "
                         f"eta {datetime.timedelta(seconds=round(eta))}{memory}")
        self.result.losses.append((step, mean_loss))
        window.reset()

    # -- 4. evaluation and checkpoints --------------------------------------------------------

    def evaluate(self, step: int) -> None:
        args = self.args
        average_batchnorm_statistics(self.model, self.rt)
        self.weights.check(step, self.result.checkpoint)
        started = time.perf_counter()
        scores = evaluate(self.model, self.val_loader, args.num_classes, self.device,
                          args.seed, self.amp_dtype)
        self.result.evaluations.append((step, scores))
        summary = scores.summary()
        self.logger.info(f"[eval {step}] " + "  ".join(f"{k} {v:.2f}" for k, v in summary.items())
                         + f"  ({len(self.val_set)} images, "
                         f"{time.perf_counter() - started:.1f} s)")
        if args.num_classes <= 20:
            self.logger.info("  IoU per class: " + " ".join(f"{100 * v:.1f}" for v in scores.iou))
        if self.rt.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(dict(step=step, **summary)) + "\n")

    def save(self, step: int) -> None:
        average_batchnorm_statistics(self.model, self.rt)
        self.weights.check(step, self.result.checkpoint)
        rng_states = gather(rng_state(self.device), self.rt)
        if self.rt.is_main:
            path = self.out_dir / f"iter_{step}.pth"
            save_checkpoint(path, training_checkpoint(
                self.args, step, self.rt.world_size, self.model, self.optimizer,
                self.scheduler, self.scaler, rng_states))
            self.result.checkpoint = path
            self.logger.info(f"saved {path}")

    def dump_weights(self) -> None:
        """Every rank writes its model's state_dict to ``--dump-weights``/rank<r>.pt."""
        average_batchnorm_statistics(self.model, self.rt)
        dump_dir = Path(self.args.dump_weights)
        try:
            dump_dir.mkdir(parents=True, exist_ok=True)
            torch.save(self.model.state_dict(), dump_dir / f"rank{self.rt.rank}.pt")
        except OSError as exc:
            raise TrainError(f"cannot write to the --dump-weights folder {dump_dir}: "
                             f"{exc.strerror or error_summary(exc)}") from None
