"""Training checkpoints: what ``--resume`` needs to continue a run exactly.

A checkpoint holds the model weights under ``state_dict`` (the official key names, so
``segnext.load_checkpoint`` and ``segnext.predict`` read it directly), the optimizer,
scheduler and GradScaler states, every rank's RNG state, and ``meta`` (format, model, class
count, step, the command line). ``save_checkpoint`` writes it atomically and points
``latest.pth`` at it; ``read_training_checkpoint`` checks a file before anything is restored;
``restore_training_state`` and ``restore_rng_streams`` put it back into the run's objects.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..checkpoint import error_summary, load_checkpoint, read_checkpoint
from ..data import derive_seed
from .errors import TrainError
from .runtime import Runtime

CHECKPOINT_FORMAT = "segnext.train/1"
LATEST = "latest.pth"
# What --resume needs of a checkpoint besides the weights, with the type each entry must have.
TRAINING_STATE = {"optimizer": dict, "scheduler": dict, "grad_scaler": dict, "rng_states": list}


def rng_state(device: torch.device) -> dict:
    """This process's RNG state: the CPU generator's, and the GPU's on CUDA."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def training_checkpoint(args, step: int, world_size: int, model: nn.Module, optimizer,
                        scheduler, scaler, rng_states: list) -> dict:
    """The payload of a checkpoint at ``step``."""
    return {
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "grad_scaler": scaler.state_dict(),
        "rng_states": rng_states,
        "meta": dict(format=CHECKPOINT_FORMAT, model=args.model,
                     num_classes=args.num_classes, step=step, iters=args.iters,
                     world_size=world_size, torch=str(torch.__version__),
                     args={k: v for k, v in vars(args).items()
                           if isinstance(v, (str, int, float, bool, type(None)))}),
    }


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


def resume_path(args, out_dir: Path) -> Optional[Path]:
    """The checkpoint ``--resume`` names (``auto``: ``<out>/latest.pth`` when it exists)."""
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


def read_training_checkpoint(path: Path, args) -> dict:
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


def restore_rng_streams(resumed: dict, path: Path, rt: Runtime, seed: int, step: int,
                        logger: logging.Logger) -> None:
    """This rank's RNG state from the checkpoint; when it was written by another number of
    processes, fresh streams seeded by (seed, rank, step), with a warning."""
    rng_states = resumed["rng_states"]
    if len(rng_states) == rt.world_size:
        try:
            set_rng_state(rng_states[rt.rank], rt.device)
        except (KeyError, TypeError, RuntimeError) as exc:
            raise TrainError(f"--resume: the RNG state in {path} is damaged: "
                             f"{error_summary(exc)}") from None
    else:
        logger.warning(f"the checkpoint was written by {len(rng_states)} process(es), this "
                       f"run has {rt.world_size}: fresh RNG streams, and a different global "
                       "batch; not an exact continuation")
        torch.manual_seed(derive_seed("train", seed, rt.rank, step))
