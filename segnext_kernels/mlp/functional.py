"""``mlp(x, w1, b1, wd, bd, w2, b2)``: the MSCAN MLP with the selected backend's kernels.

Inference (no gradient needed) runs the whole MLP as one fused op where the backend has one
and it is faster (``cpu``: the hidden activation never leaves the cache). Otherwise fc1 and fc2
stay PyTorch convs and the dwconv + GELU between them is the ``dwconv_gelu`` op, whose backward
is fused too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import autocast_inputs, check_same, check_shape, check_tensor, memory_format_of
from ..dispatch import Problem, layout_of, needs_grad, select
from ..dwconv_gelu import dwconv_gelu
from .reference import mlp_ref

_NAMES = ("w1", "b1", "wd", "bd", "w2", "b2")


def mlp(x: Tensor, w1: Tensor, b1: Tensor, wd: Tensor, bd: Tensor, w2: Tensor, b2: Tensor, *,
        backend: str | None = None) -> Tensor:
    """``fc2(gelu(dw3x3(fc1(x))))`` for ``x`` (B, C, H, W), contiguous or channels_last (the
    fast layout); ``w1`` (hidden, C, 1, 1), ``b1`` (hidden,), ``wd`` (hidden, 1, 3, 3), ``bd``
    (hidden,), ``w2`` (C, hidden, 1, 1), ``b2`` (C,). Returns ``x``'s dtype and memory format.
    """
    check_tensor("x", x, dim=4)
    weights = [w1, b1, wd, bd, w2, b2]
    for name, w in zip(_NAMES, weights):
        check_tensor(name, w)
    C = x.shape[1]
    if w1.dim() != 4 or tuple(w1.shape[1:]) != (C, 1, 1):
        raise ValueError(f"w1 must have shape (hidden, {C}, 1, 1) for x with {C} channels, "
                         f"got {tuple(w1.shape)}")
    hidden = w1.shape[0]
    for name, w, shape in zip(_NAMES[1:], weights[1:], [(hidden,), (hidden, 1, 3, 3), (hidden,),
                                                        (C, hidden, 1, 1), (C,)]):
        check_shape(name, w, shape)
    x, weights = autocast_inputs(x, weights)
    check_same("x", x, list(zip(_NAMES, weights)))
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    name = select(Problem("mlp", x.device, x.dtype, layout_of(x), tuple(x.shape),
                          needs_grad(x, *weights), (("hidden", hidden),)), backend)
    if name != "reference":
        from ..ops import mlp_fused
        x = x.contiguous(memory_format=memory_format_of(x))
        return mlp_fused(x, [w.contiguous() for w in weights], name)
    # No fused MLP for this call (autograd needs the graph, or no faster kernel): fc1 and fc2
    # stay PyTorch convs, and the dwconv + GELU between them is ``dwconv_gelu`` under the same
    # backend request (with "reference", this is the reference MLP).
    w1, b1, wd, bd, w2, b2 = weights
    return F.conv2d(dwconv_gelu(F.conv2d(x, w1, b1), wd, bd, backend=backend), w2, b2)
