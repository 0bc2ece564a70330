"""The non-finite checks of a run: it stops, with a one-line ``TrainError``, before it logs,
evaluates or saves a loss or weights that hold NaN or infinity."""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from .errors import TrainError
from .runtime import Runtime, sum_over_ranks

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


def check_loss(mean_loss: float, step: int) -> None:
    """Stop on a non-finite logged loss."""
    if not math.isfinite(mean_loss):
        raise TrainError(f"the loss is {mean_loss} at iteration {step}; stopped "
                         "(a smaller --lr or a longer --warmup-iters may help)")


class WeightsCheck:
    """``check(step, last_checkpoint)`` stops every rank together when any rank's weights hold
    NaN or infinity; a step is checked once, however many times it is asked."""

    def __init__(self, model: nn.Module, rt: Runtime):
        self.model, self.rt = model, rt
        self.checked_step: Optional[int] = None

    def check(self, step: int, last_checkpoint: Optional[Path]) -> None:
        if self.checked_step == step:
            return
        self.checked_step = step
        bad = non_finite_state(self.model)
        if sum_over_ranks(len(bad), self.rt):  # every rank must stop together
            shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "") if bad else \
                "on another process"
            kept = (f"the last checkpoint written, {last_checkpoint}, is intact"
                    if last_checkpoint else "no checkpoint was written")
            raise TrainError(f"the weights hold NaN or infinity after iteration {step} "
                             f"({shown}); stopped without saving them ({kept}). A smaller "
                             "--lr or a longer --warmup-iters may help")
