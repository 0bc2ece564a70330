"""Level "strip": one depthwise strip convolution (1x7, 1x21, 21x1 with bias), forward.

Variants: PyTorch ``F.conv2d(groups=C)`` (cuDNN / oneDNN / the native depthwise kernel) in
NCHW and channels_last — the eager baselines — and ``segnext_kernels._strip_conv.strip_conv`` (private) on every
backend that has a strip-conv kernel for the device (``cpu``: the C++ op of ``_C``,
forward only).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from . import roofline
from .common import cycle, fused_variants, n_rotations, to_layout
from .runner import Case, Config, Variant

KERNELS = ((1, 7), (1, 21), (21, 1))


def shape(cfg: Config) -> Tuple[int, int, int, int]:
    if cfg.size == "smoke":
        return (1, 8, 16, 16)
    if cfg.cuda:
        return (16, 64, 128, 128)   # MSCAN-B stage 1 at 512x512, the GPU shape
    return (2, 64, 128, 128)


def _inputs(B, C, H, W, k, cfg: Config, layout: str):
    dev, dt = cfg.device, cfg.dtype
    w = torch.randn(C, 1, *k, device=dev, dtype=dt) / k[0] / k[1]
    b = torch.randn(C, device=dev, dtype=dt)
    n = n_rotations(B * C * H * W * w.element_size(), cfg)
    xs = [(to_layout(torch.randn(B, C, H, W, device=dev, dtype=dt), layout),) for _ in range(n)]
    return xs, w, b


def _make_conv2d(dims, k, cfg, layout):
    def make():
        xs, w, b = _inputs(*dims, k, cfg, layout)
        nxt = cycle(xs)
        pad = (k[0] // 2, k[1] // 2)
        C = dims[1]
        return lambda: F.conv2d(nxt()[0], w, b, padding=pad, groups=C)
    return make


def _make_ours(dims, k, cfg):
    def make_for(backend, layout):
        def make():
            from segnext_kernels._strip_conv import strip_conv
            xs, w, b = _inputs(*dims, k, cfg, layout)
            nxt = cycle(xs)
            return lambda: strip_conv(nxt()[0], w, b, backend=backend)
        return make
    return make_for


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    B, C, H, W = shape(cfg)
    out, notes = [], []
    for k in KERNELS:
        dims = (B, C, H, W)
        variants = [Variant("conv2d", layout, "reference", baseline=True,
                            make=_make_conv2d(dims, k, cfg, layout)) for layout in ("nchw", "cl")]
        fused, fused_notes = fused_variants("strip_conv", cfg, ("nchw", "cl"),
                                            _make_ours(dims, k, cfg))
        notes += fused_notes
        out.append(Case(level="strip", pass_="fwd", shape=f"B{B} C{C} {H}x{W} k{k[0]}x{k[1]}",
                        params=dict(B=B, C=C, H=H, W=W, kh=k[0], kw=k[1]), dtype=cfg.dtype_name,
                        variants=variants + fused,
                        cost=roofline.strip_conv_cost(B, C, H, W, max(k), cfg.dtype)))
    notes = list(dict.fromkeys(notes))
    notes.append("strip: torch.compile adds nothing here (Inductor calls the same ATen conv); not run")
    return out, notes
