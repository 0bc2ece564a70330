"""``conv1x1(x, weight, bias, act=..., residual=..., scale=...)``: validate, pick the backend,
run the fused op (inference) or the reference."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._validate import autocast_inputs, check_same, check_shape, check_tensor, memory_format_of
from ..dispatch import Problem, layout_of, needs_grad, ran, select
from .reference import conv1x1_ref

ACTIVATIONS = ("none", "gelu", "relu")


def conv1x1(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, act: str = "none",
            residual: Optional[Tensor] = None, scale: Optional[Tensor] = None,
            backend: str | None = None) -> Tensor:
    """``act(conv2d(x, weight, bias)) + scale * residual`` with the epilogue fused where the
    backend has a kernel (``cpu``, inference): the result is written once. ``x`` (B, K, H, W),
    channels_last the fast layout; ``weight`` (N, K, 1, 1); ``bias`` (N,) or None; ``act``
    "none", "gelu" (exact erf) or "relu"; ``residual`` (B, N, H, W) or None; ``scale`` N values
    (one per output channel, any shape) or None (1). Returns ``x``'s dtype and memory format.
    """
    check_tensor("x", x, dim=4)
    check_tensor("weight", weight)
    B, K, H, W = x.shape
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (K, 1, 1):
        raise ValueError(f"weight must have shape (out, {K}, 1, 1) for x with {K} channels, "
                         f"got {tuple(weight.shape)}")
    N = weight.shape[0]
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    named = [("weight", weight)]
    if bias is not None:
        check_tensor("bias", bias)
        check_shape("bias", bias, (N,))
        named.append(("bias", bias))
    if scale is not None and residual is None:
        raise ValueError("scale is given without a residual")
    if residual is not None:
        check_tensor("residual", residual, dim=4)
        check_shape("residual", residual, (B, N, H, W))
        named.append(("residual", residual))
    if scale is not None:
        check_tensor("scale", scale)
        if scale.numel() != N:
            raise ValueError(f"scale must have {N} elements (one per output channel), "
                             f"got shape {tuple(scale.shape)}")
        named.append(("scale", scale))
    x, others = autocast_inputs(x, [t for _, t in named])
    named = [(n, t) for (n, _), t in zip(named, others)]
    check_same("x", x, named)
    t = dict(named)
    weight, bias, residual, scale = t["weight"], t.get("bias"), t.get("residual"), t.get("scale")
    name = select(Problem("conv1x1", x.device, x.dtype, layout_of(x), tuple(x.shape),
                          needs_grad(x, *others), (("out", N),)), backend)
    if name == "reference" or x.numel() == 0:
        ran("conv1x1", "reference")
        return conv1x1_ref(x, weight, bias, act, residual, scale)
    from ..ops import conv1x1_fused
    return conv1x1_fused(x.contiguous(memory_format=memory_format_of(x)), weight, bias, act,
                         residual, scale, name)
