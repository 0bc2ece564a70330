"""Eval-time folding for the fused inference path: weights derived from a module's parameters
and buffers (eval-mode norms folded into the convs around them, weight slices), computed once
and kept until one of their sources changes.

The fused path runs only for inference (eval mode, no gradient) when the backend runs the fused
1x1 convs on this input; the reference backend, training and anything needing gradients run
the modules as written. Folding changes the rounding, not the arithmetic.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from segnext_kernels.dispatch import Problem, layout_of, select


def fused_inference(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` runs its folded inference path on ``x``."""
    if module.training or torch.is_grad_enabled():
        return False
    p = Problem("conv1x1", x.device, x.dtype, layout_of(x), tuple(x.shape), False)
    return select(p) != "reference"


def has_running_stats(norm: nn.Module) -> bool:
    return isinstance(norm, nn.modules.batchnorm._BatchNorm) and \
        norm.running_mean is not None and norm.running_var is not None


def wide(t):
    """Folding arithmetic runs in float32 at least (a bfloat16 model rounds once, at the end)."""
    return None if t is None else (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)


def bn_affine(norm: nn.Module):
    """An eval-mode batch norm as y = s * x + t (per channel), in float32 at least."""
    s = torch.rsqrt(wide(norm.running_var) + norm.eps)
    if norm.weight is not None:
        s = s * wide(norm.weight)
    t = -wide(norm.running_mean) * s
    return s, (t + wide(norm.bias) if norm.bias is not None else t)


def fold_bn_into_conv(conv: nn.Conv2d, norm: nn.Module):
    """(weight, bias) of conv followed by the eval-mode batch norm ``norm``, in the conv's
    dtype."""
    s, t = bn_affine(norm)
    w = wide(conv.weight) * s.reshape(-1, 1, 1, 1)
    b = t if conv.bias is None else wide(conv.bias) * s + t
    return w.to(conv.weight.dtype), b.to(conv.weight.dtype)


def autocast_dtype(x: torch.Tensor):
    """The dtype autocast computes convs in for ``x``, or None when autocast is off."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def cached(module: nn.Module, name: str, sources: Sequence[torch.Tensor], make: Callable,
           extra=None):
    """``make()``, kept on ``module`` (as the attribute ``name``, not state) until one of
    ``sources`` changes storage or version (or ``extra`` changes). While tracing
    (torch.compile) it is recomputed in the graph, without a cache."""
    compiling = torch.compiler.is_compiling()
    key = None if compiling else tuple((t.data_ptr(), t._version, t.dtype, t.device)
                                       for t in sources) + (extra,)
    hit = module.__dict__.get(name)
    if key is not None and hit is not None and hit[0] == key:
        return hit[1]
    value = make()
    if key is not None:
        object.__setattr__(module, name, (key, value))
    return value


def sources_of(*modules: nn.Module):
    """Every parameter and buffer of ``modules`` (what their folded weights derive from)."""
    out = []
    for m in modules:
        out += [t for t in m.parameters(recurse=False)] + [t for t in m.buffers(recurse=False)
                                                            if t.is_floating_point()]
    return out
