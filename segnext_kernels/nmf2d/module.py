"""``NMF2D``: the Hamburger "ham" module (no parameters, nothing in the state_dict)."""
from __future__ import annotations

import torch
from torch import nn

from .functional import check_scalars, nmf2d
from .reference import GRAD_MODES


class NMF2D(nn.Module):
    """NMF decomposition with SegNeXt's settings: ``train_steps`` (6) iterations in training,
    ``eval_steps`` (7) in eval, fresh random bases per call and per sample, inv_t 1, eps 1e-6."""

    def __init__(self, S: int = 1, R: int = 64, train_steps: int = 6, eval_steps: int = 7,
                 inv_t: float = 1.0, eps: float = 1e-6, grad: str = "unrolled"):
        super().__init__()
        if grad not in GRAD_MODES:
            raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
        check_scalars(R, S, eps, inv_t, train_steps=train_steps, eval_steps=eval_steps)
        self.S, self.R = S, R
        self.train_steps, self.eval_steps = train_steps, eval_steps
        self.inv_t, self.eps, self.grad = inv_t, eps, grad

    def forward(self, x: torch.Tensor, bases: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        steps = self.train_steps if self.training else self.eval_steps
        return nmf2d(x, R=self.R, steps=steps, S=self.S, bases=bases, generator=generator,
                     eps=self.eps, inv_t=self.inv_t, grad=self.grad)

    def extra_repr(self) -> str:
        return (f"S={self.S}, R={self.R}, train_steps={self.train_steps}, "
                f"eval_steps={self.eval_steps}, inv_t={self.inv_t}, grad={self.grad!r}")
