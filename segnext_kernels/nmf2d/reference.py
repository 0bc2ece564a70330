"""NMF2D reference (Hamburger's matrix decomposition): the specification, plain PyTorch.

The algorithm (docs/nmf.md#algorithm): X (B·S, D, N) = x viewed with channels as rows; bases B0 uniform
[0, 1) L2-normalised over D; coef0 = softmax(inv_t · Xᵀ B0) over R; then ``steps`` times
coef ← coef ⊙ (Xᵀ B) ⊘ (coef BᵀB + eps) and B ← B ⊙ (X coef) ⊘ (B coefᵀcoef + eps);
one final coef update; reconstruction B coefᵀ.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import check_one_device

GRAD_MODES = ("unrolled", "one_step")


def draw_bases(batch: int, D: int, R: int, *, device, generator=None,
               dtype=torch.float32) -> Tensor:
    """Random bases (batch, D, R): uniform [0, 1), each column L2-normalised over D."""
    for name, n in (("batch", batch), ("D", D), ("R", R)):
        if isinstance(n, torch.Tensor) and torch.jit.is_tracing():
            continue  # sizes are traced tensors while exporting to ONNX
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an int >= 1, got {n!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    b = torch.rand((batch, D, R), generator=generator, device=device, dtype=dtype)
    return F.normalize(b, dim=1)


def coef_update(X: Tensor, bases: Tensor, coef: Tensor, eps: float) -> Tensor:
    num = torch.bmm(X.transpose(1, 2), bases)                      # (b, N, R)
    den = torch.bmm(coef, torch.bmm(bases.transpose(1, 2), bases))  # (b, N, R)
    return coef * num / (den + eps)


def bases_update(X: Tensor, bases: Tensor, coef: Tensor, eps: float) -> Tensor:
    num = torch.bmm(X, coef)                                         # (b, D, R)
    den = torch.bmm(bases, torch.bmm(coef.transpose(1, 2), coef))   # (b, D, R)
    return bases * num / (den + eps)


def coef_init(X: Tensor, bases: Tensor, inv_t: float) -> Tensor:
    return torch.softmax(inv_t * torch.bmm(X.transpose(1, 2), bases), dim=-1)


def nmf_iterate(X: Tensor, bases: Tensor, steps: int, eps: float, inv_t: float):
    """Coef init and ``steps`` (coef, bases) updates; returns (bases, coef) before the last coef update."""
    coef = coef_init(X, bases, inv_t)
    for _ in range(steps):
        coef = coef_update(X, bases, coef, eps)
        bases = bases_update(X, bases, coef, eps)
    return bases, coef


def nmf_decompose_ref(X: Tensor, bases: Tensor, steps: int, eps: float = 1e-6,
                      inv_t: float = 1.0, grad: str = "unrolled") -> Tensor:
    """X (b, D, N) ≥ 0 and bases (b, D, R) → reconstruction (b, D, N)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
    check_one_device("nmf_decompose_ref", [("X", X), ("bases", bases)])
    if grad == "one_step":
        with torch.no_grad():
            bases, coef = nmf_iterate(X, bases, steps, eps, inv_t)
        bases, coef = bases.detach(), coef.detach()
    else:
        bases, coef = nmf_iterate(X, bases, steps, eps, inv_t)
    coef = coef_update(X, bases, coef, eps)
    return torch.bmm(bases, coef.transpose(1, 2))
