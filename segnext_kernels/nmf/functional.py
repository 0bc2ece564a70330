"""``nmf2d(x, R=..., steps=...)``: validate, draw bases, pick the backend, run."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .._validate import check_tensor
from ..dispatch import Problem, needs_grad, ran, select
from .reference import GRAD_MODES, draw_bases, nmf_decompose_ref


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _check_float(name: str, v, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
            (positive and v <= 0):
        what = "a finite float > 0" if positive else "a finite float"
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return float(v)


def _should_check_values(x: Tensor) -> bool:
    """The value check costs one reduction and, on a GPU, one sync: skipped where it cannot run
    (torch.compile tracing, CUDA-graph capture)."""
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_bases(bases: Tensor, x: Tensor, shape) -> None:
    if tuple(bases.shape) != shape:
        raise ValueError(f"bases must have shape (B*S, D, R) = {shape}, got {tuple(bases.shape)}")
    if bases.device != x.device:
        raise ValueError(f"bases is on {bases.device} but x is on {x.device}")


def nmf2d(x: Tensor, *, R: int, steps: int, S: int = 1, bases: Tensor | None = None,
          generator: torch.Generator | None = None, eps: float = 1e-6, inv_t: float = 1.0,
          grad: str = "unrolled", backend: str | None = None) -> Tensor:
    """NMF matrix decomposition of Hamburger (SegNeXt's LightHamHead), returning the reconstruction.

    ``x``: (B, C, H, W) non-negative; C is split into ``S`` groups of D = C/S rows, N = H·W.
    ``bases``: (B·S, D, R) initial bases; drawn per call and per sample (uniform, L2-normalised
    over D, with ``generator`` if given) when None. ``grad``: ``"unrolled"`` (autograd through
    every iteration, as the official checkpoints were trained) or ``"one_step"`` (only the last
    coef update and the reconstruction carry gradient). Computes in float32 (float64 for float64
    input), also under autocast; returns ``x``'s dtype.
    """
    check_tensor("x", x, dim=4)
    _check_int("R", R, 1)
    _check_int("steps", steps, 0)
    _check_int("S", S, 1)
    eps = _check_float("eps", eps, positive=True)
    inv_t = _check_float("inv_t", inv_t, positive=False)
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
    B, C, H, W = x.shape
    if C % S:
        raise ValueError(f"the channel count C={C} of x must be divisible by S={S}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    D, N = C // S, H * W
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if bases is not None:
        check_tensor("bases", bases, dim=3)
    name = select(Problem("nmf2d", x.device, cdtype, "contiguous", (B * S, D, N),
                          needs_grad(x, bases), (("D", D), ("N", N), ("R", R))), backend)
    # (the cpu kernel checks the values itself, as it reads them)
    if name != "cpu" and _should_check_values(x) and not bool((x >= 0).all()):  # also NaN
        raise ValueError("x must be non-negative and not NaN (NMF of a ReLU output); "
                         "got negative or NaN entries")
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device} but x is on {x.device}; "
                         "the bases are drawn on x's device")

    no_autocast = (torch.autocast(x.device.type, enabled=False)
                   if torch.amp.is_autocast_available(x.device.type) else contextlib.nullcontext())
    with no_autocast:
        if name == "cpu":  # ---- the cpu kernel: on the (B, C, H, W) map itself, inference only
            from ..ops import nmf2d_cpu
            if bases is None:
                bases = draw_bases(B * S, D, R, device=x.device, generator=generator, dtype=cdtype)
            else:
                _check_bases(bases, x, (B * S, D, R))
            return nmf2d_cpu(x, bases.to(cdtype), S, steps, eps, inv_t).to(x.dtype)
        X = x.reshape(B * S, D, N).to(cdtype)
        if bases is None:
            bases = draw_bases(B * S, D, R, device=x.device, generator=generator, dtype=cdtype)
        else:
            _check_bases(bases, x, (B * S, D, R))
            bases = bases.to(cdtype)
        if name == "reference":
            ran("nmf2d", "reference")
            Y = nmf_decompose_ref(X, bases, steps, eps, inv_t, grad)
        else:
            from ..ops import nmf2d_fused
            Y = nmf2d_fused(X.contiguous(), bases.contiguous(), steps, eps, inv_t, grad, name)
    return Y.reshape(B, C, H, W).to(x.dtype)

