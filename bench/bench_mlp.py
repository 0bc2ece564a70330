"""Level "mlp": the MSCAN MLP's fused ops.

- ``dwconv_gelu``: the depthwise 3x3 conv + bias + GELU on the MLP's hidden activation
  (4-8x the block's channels), forward and forward+backward (gradients of x, weight, bias).
- ``mlp``: the whole MLP, fc2(gelu(dw3x3(fc1(x)))), forward for inference (no grad).

Variants: the eager references (``dwconv_gelu_ref``: oneDNN/cuDNN depthwise conv then GELU;
``mlp_ref``: conv, that, conv) in NCHW and channels_last — the baselines —, ``torch.compile`` of
them (channels_last), and every fused backend of the op (``cpu`` on CPU), both layouts.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from . import roofline
from .common import (cycle, fused_variants, n_rotations, primary_layout, segnext_stage_shapes,
                     to_layout)
from .runner import Case, Config, Variant


def shapes(cfg: Config) -> List[Tuple[int, int, int, int, int]]:
    """(B, C, H, W, mlp_ratio): MSCAN stages at 512x512 input (hidden = C * mlp_ratio)."""
    if cfg.op_shapes == "segnext":
        return segnext_stage_shapes()
    if cfg.size == "smoke":
        return [(1, 8, 16, 16, 4)]
    if cfg.cuda:
        return [(16, 64, 128, 128, 8), (16, 320, 32, 32, 4)]   # MSCAN-B stages 1 and 3
    if cfg.size == "quick":
        return [(1, 32, 64, 64, 8)]
    return [(1, 32, 128, 128, 8), (1, 64, 64, 64, 8), (1, 160, 32, 32, 4)]  # MSCAN-T 1-3


def _params(C: int, hidden: int, cfg: Config, requires_grad: bool):
    """fc1, dwconv, fc2 weights and biases, initialised as MSCAN.init_weights does."""
    from segnext.mscan import Mlp
    m = Mlp(C, hidden).to(device=cfg.device, dtype=cfg.dtype)
    m.apply(lambda mod: torch.nn.init.normal_(mod.bias, 0.0, 0.1)
            if isinstance(mod, torch.nn.Conv2d) else None)  # nonzero biases: all terms count
    ws = [m.fc1.weight, m.fc1.bias, m.dwconv.dwconv.weight, m.dwconv.dwconv.bias,
          m.fc2.weight, m.fc2.bias]
    return [w.detach().clone().requires_grad_(requires_grad) for w in ws]


def _timed(op: str, fn, dims, cfg: Config, layout: str, backward: bool):
    B, C, H, W, ratio = dims
    hidden = C * ratio
    params = _params(C, hidden, cfg, backward)
    if op == "dwconv_gelu":
        params = params[2:4]
        shape = (B, hidden, H, W)
    else:
        shape = (B, C, H, W)
    nbytes = B * shape[1] * H * W * roofline.elsize(cfg.dtype) * (2 if backward else 1)
    sets = []
    for _ in range(n_rotations(nbytes, cfg)):
        x = to_layout(torch.randn(shape, device=cfg.device, dtype=cfg.dtype), layout)
        g = to_layout(torch.randn(shape, device=cfg.device, dtype=cfg.dtype), layout)
        sets.append((x.requires_grad_(backward), g))
    nxt = cycle(sets)
    if backward:
        def fwd_bwd():
            x, g = nxt()
            return torch.autograd.grad(fn(x, *params), [x] + params, g)
        return fwd_bwd

    def fwd():
        with torch.no_grad():
            return fn(nxt()[0], *params)
    return fwd


def _reference(op: str):
    from segnext_kernels import dwconv_gelu_ref, mlp_ref
    return dwconv_gelu_ref if op == "dwconv_gelu" else mlp_ref


def _make(op, dims, cfg, layout, backward, backend=None, compiled=False):
    def make():
        import segnext_kernels as sk
        if backend is None:
            fn = _reference(op)
            fn = torch.compile(fn, dynamic=False) if compiled else fn
        else:
            public = sk.dwconv_gelu if op == "dwconv_gelu" else sk.mlp

            def fn(x, *w):
                return public(x, *w, backend=backend)
        return _timed(op, fn, dims, cfg, layout, backward)
    return make


def _cost(op: str, dims, cfg: Config, backward: bool) -> roofline.Cost:
    B, C, H, W, ratio = dims
    if op == "dwconv_gelu":
        return roofline.dwconv_gelu_cost(B, C * ratio, H, W, cfg.dtype, backward)
    return roofline.mlp_cost(B, C, H, W, ratio, cfg.dtype)


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    out, notes = [], []
    for dims in shapes(cfg):
        B, C, H, W, ratio = dims
        for op, passes in (("dwconv_gelu", (False, True)), ("mlp", (False,))):
            for backward in passes:
                variants = [Variant("eager", layout, "reference", baseline=True,
                                    make=_make(op, dims, cfg, layout, backward))
                            for layout in ("nchw", "cl")]
                if cfg.compile:
                    layout = primary_layout(cfg)
                    variants.append(Variant("compile", layout, "reference", compiles=True,
                                            make=_make(op, dims, cfg, layout, backward,
                                                       compiled=True)))
                fused, fused_notes = fused_variants(
                    op, cfg, ("nchw", "cl"),
                    lambda b, layout, op=op, dims=dims, backward=backward:
                        _make(op, dims, cfg, layout, backward, backend=b))
                notes += fused_notes
                what = (f"dwconv_gelu B{B} C{C * ratio} {H}x{W}" if op == "dwconv_gelu"
                        else f"mlp B{B} C{C}->{C * ratio} {H}x{W}")
                out.append(Case(level="mlp", pass_="fwd+bwd" if backward else "fwd",
                                shape=what, params=dict(op=op, B=B, C=C, H=H, W=W, mlp_ratio=ratio),
                                dtype=cfg.dtype_name, variants=variants + fused,
                                cost=_cost(op, dims, cfg, backward)))
    return out, list(dict.fromkeys(notes))
