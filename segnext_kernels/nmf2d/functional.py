"""``nmf2d(x, R=..., steps=...)``: validate, draw bases, pick the backend, run."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .. import _env
from .._validate import check_tensor
from ..dispatch import Problem, needs_grad, ran, select
from .reference import GRAD_MODES, draw_bases, nmf_decompose_ref


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


# Ranges of eps and inv_t that keep the float32 iterations finite (float64 input computes in
# float64; the float32 bounds hold for it too):
# - eps is added to the denominators of the multiplicative updates, coef·(BᵀB) and
#   B·(coefᵀcoef). Those are exactly 0 where a row of x is 0 (that bases row becomes 0) or a
#   coef column underflows to 0, and there the numerator is 0 as well: eps must keep 0/0 from
#   happening, so it must be a normal float32 (> 1.2e-38: not rounded to 0, and not a subnormal
#   that flush-to-zero arithmetic drops). EPS_MIN = 1e-30 leaves 8 decades of margin; EPS_MAX is
#   the largest float32.
# - inv_t scales Xᵀ B before the softmax of the coef init. A softmax is NaN only when an input
#   is infinite (inf - inf), so inv_t · Xᵀ B must stay a finite float32. |inv_t| <= INV_T_MAX =
#   1e4 keeps it finite whenever |Xᵀ B| <= 3.4e34 (drawn bases have unit columns, so |Xᵀ B| is
#   at most the norm of a column of x). At 1e4 the softmax is already a hard argmax for
#   differences above 1e-2; SegNeXt's NMF uses 1 (the configs' 100 is overridden to 1).
EPS_MIN, EPS_MAX = 1e-30, float(torch.finfo(torch.float32).max)
INV_T_MAX = 1e4


def _check_float(name: str, v, low: float, high: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
            not low <= v <= high:
        what = "a finite float > 0" if low > 0 else "a finite float"
        raise ValueError(f"{name} must be {what} within [{low:g}, {high:g}], got {v!r}")
    return float(v)


def check_scalars(R, S, eps, inv_t, **steps) -> tuple[float, float]:
    """Check the scalar arguments of ``nmf2d`` (``steps``: each iteration count by its name);
    returns (eps, inv_t) as floats."""
    _check_int("R", R, 1)
    _check_int("S", S, 1)
    for name, value in steps.items():
        _check_int(name, value, 0)
    return (_check_float("eps", eps, EPS_MIN, EPS_MAX),
            _check_float("inv_t", inv_t, -INV_T_MAX, INV_T_MAX))


def _check_values(name: str, t: Tensor) -> None:
    """SEGNEXT_CHECK_INPUTS=1 only: a value check reads the tensor back to the host, which waits
    for the GPU on every call (and cannot run under torch.compile, CUDA-graph capture, or on
    meta tensors)."""
    if not _env.check_inputs() or torch.compiler.is_compiling() or t.device.type == "meta" or \
            (t.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    if not bool(((t >= 0) & torch.isfinite(t)).all()):  # NaN fails both
        raise ValueError(f"{name} must be non-negative and finite (SEGNEXT_CHECK_INPUTS=1); "
                         "got negative, NaN or infinite entries")


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

    Values are not checked, as in torch ops (a check would wait for the GPU on every call): NaN
    in ``x`` or ``bases`` gives NaN out, as in mmseg's NMF2D; negative entries give a meaningless
    decomposition. ``SEGNEXT_CHECK_INPUTS=1`` refuses negative, NaN and infinite entries of ``x``
    and ``bases``.
    """
    check_tensor("x", x, dim=4)
    eps, inv_t = check_scalars(R, S, eps, inv_t, steps=steps)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
    B, C, H, W = x.shape
    if C % S:
        raise ValueError(f"the channel count C={C} of x must be divisible by S={S}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    D, N = C // S, H * W
    _check_values("x", x)
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if bases is not None:
        check_tensor("bases", bases, dim=3)
    name = select(Problem("nmf2d", x.device, cdtype, "contiguous", (B * S, D, N),
                          needs_grad(x, bases), (("D", D), ("N", N), ("R", R))), backend)
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device} but x is on {x.device}; "
                         "the bases are drawn on x's device")

    no_autocast = (torch.autocast(x.device.type, enabled=False)
                   if torch.amp.is_autocast_available(x.device.type) else contextlib.nullcontext())
    with no_autocast:
        if name == "cpu":  # ---- the cpu kernel: on the (B, C, H, W) map itself, inference only
            from ..ops import nmf2d_inference
            if bases is None:
                bases = draw_bases(B * S, D, R, device=x.device, generator=generator, dtype=cdtype)
            else:
                _check_bases(bases, x, (B * S, D, R))
                _check_values("bases", bases)
            return nmf2d_inference(x, bases.to(cdtype), S, steps, eps, inv_t).to(x.dtype)
        X = x.reshape(B * S, D, N).to(cdtype)
        if bases is None:
            bases = draw_bases(B * S, D, R, device=x.device, generator=generator, dtype=cdtype)
        else:
            _check_bases(bases, x, (B * S, D, R))
            _check_values("bases", bases)
            bases = bases.to(cdtype)
        if name == "reference":
            ran("nmf2d", "reference")
            Y = nmf_decompose_ref(X, bases, steps, eps, inv_t, grad)
        else:
            from ..ops import nmf2d_fused
            Y = nmf2d_fused(X.contiguous(), bases.contiguous(), steps, eps, inv_t, grad, name)
    return Y.reshape(B, C, H, W).to(x.dtype)

