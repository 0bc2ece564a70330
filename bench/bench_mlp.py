"""Level "mlp": the whole MSCAN MLP, ``fc2(gelu(dw3x3(fc1(x))))``, forward for inference (no
grad). Its depthwise 3x3 + GELU alone, forward and backward: level "dwconv_gelu"
(``bench_dwconv_gelu``), on the same shapes and weights.

Variants: the eager reference (``mlp_ref``: conv, depthwise conv, GELU, conv) in NCHW and
channels_last — the baselines —, ``torch.compile`` of it (channels_last), and every fused backend
of the op (``cpu`` on CPU), both layouts.
"""
from __future__ import annotations

from functools import partial
from typing import List, Tuple

import torch

from . import roofline
from .common import op_make, op_variants, stage_shapes
from .runner import Case, Config


def shapes(cfg: Config) -> List[Tuple[int, int, int, int, int]]:
    """(B, C, H, W, mlp_ratio): MSCAN stages at 512x512 input (hidden = C * mlp_ratio)."""
    return stage_shapes(cfg, quick=[(1, 32, 64, 64, 8)],
                        full=[(1, 32, 128, 128, 8), (1, 64, 64, 64, 8),   # MSCAN-T stages 1-3
                              (1, 160, 32, 32, 4)])


def params(C: int, hidden: int, cfg: Config, requires_grad: bool) -> List[torch.Tensor]:
    """fc1, dwconv, fc2 weights and biases, initialised as MSCAN.init_weights does."""
    from segnext.mscan import Mlp
    m = Mlp(C, hidden).to(device=cfg.device, dtype=cfg.dtype)
    m.apply(lambda mod: torch.nn.init.normal_(mod.bias, 0.0, 0.1)
            if isinstance(mod, torch.nn.Conv2d) else None)  # nonzero biases: all terms count
    ws = [m.fc1.weight, m.fc1.bias, m.dwconv.dwconv.weight, m.dwconv.dwconv.bias,
          m.fc2.weight, m.fc2.bias]
    return [w.detach().clone().requires_grad_(requires_grad) for w in ws]


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    out, notes = [], []
    for B, C, H, W, ratio in shapes(cfg):
        weights = partial(params, C, C * ratio, cfg, False)
        make = op_make("mlp", (B, C, H, W), weights, cfg, backward=False)
        variants, ns = op_variants("mlp", cfg, make)
        notes += ns
        out.append(Case(level="mlp", pass_="fwd", shape=f"mlp B{B} C{C}->{C * ratio} {H}x{W}",
                        params=dict(op="mlp", B=B, C=C, H=H, W=W, mlp_ratio=ratio),
                        dtype=cfg.dtype_name, variants=variants,
                        cost=roofline.mlp_cost(B, C, H, W, ratio, cfg.dtype)))
    notes.append("mlp: its depthwise 3x3 + GELU alone, forward and backward, is the level "
                 "dwconv_gelu (--levels dwconv_gelu,mlp for both)")
    return out, list(dict.fromkeys(notes))
