"""Level "block": one MSCAN block (BN, proj_1, GELU, MSCA, proj_2, layer scale, BN, MLP with a
depthwise 3x3), forward (eval, no grad) and forward+backward (train mode, gradients of the input
and every parameter).

Variants: the block with the reference MSCA (``use_backend("reference")``) in NCHW and
channels_last — the baselines —, ``torch.compile`` of it (channels_last), and the block with
each fused MSCA backend of the device. Half dtypes run under autocast with float32 parameters,
as mixed-precision training does.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from . import roofline
from .common import (amp_dtype_name, autocast_ctx, cycle, n_rotations, op_variants, stage_shapes,
                     timed_inference, to_layout)
from .runner import Case, Config


def shapes(cfg: Config) -> List[Tuple[int, int, int, int, int]]:
    """(B, C, H, W, mlp_ratio) of MSCAN stages at 512x512 input."""
    return stage_shapes(cfg, quick=[(1, 64, 64, 64, 8)],                  # MSCAN-T stage 2
                        full=[(2, 64, 64, 64, 8), (2, 160, 32, 32, 4)])  # MSCAN-T stages 2 and 3


def _timed(dims, cfg: Config, layout: str, backward: bool, backend: str, compiled: bool):
    from torch import nn

    from segnext import Block
    import segnext_kernels as sk

    B, C, H, W, ratio = dims
    block = Block(C, ratio, nn.BatchNorm2d).to(cfg.device)
    block = block.to(memory_format=torch.channels_last) if layout == "cl" else block
    block.train(backward)
    params = [p for p in block.parameters() if p.requires_grad]
    sets = []
    # float32 inputs and parameters; half dtypes run under autocast (mixed precision)
    for _ in range(n_rotations(B * C * H * W * 4 * (2 if backward else 1), cfg)):
        x = to_layout(torch.randn(B, C, H, W, device=cfg.device), layout)
        sets.append((x.requires_grad_(backward), to_layout(torch.randn_like(x), layout)))
    nxt = cycle(sets)
    run = torch.compile(block, dynamic=False) if compiled else block

    if backward:
        def fwd_bwd():
            x, g = nxt()
            with sk.use_backend(backend), autocast_ctx(cfg):
                out = run(x)
            return torch.autograd.grad(out, [x] + params, g.to(out.dtype))
        return fwd_bwd

    return timed_inference(run, nxt, backend, cfg)


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    out, notes = [], []
    for dims in shapes(cfg):
        B, C, H, W, ratio = dims
        for backward in (False, True):
            def make_for(layout, backend="reference", compiled=False, dims=dims, backward=backward):
                return lambda: _timed(dims, cfg, layout, backward, backend, compiled)
            variants, ns = op_variants("msca", cfg, make_for)
            notes += ns
            out.append(Case(level="block", pass_="fwd+bwd" if backward else "fwd",
                            shape=f"B{B} C{C} {H}x{W} mlp x{ratio}",
                            params=dict(B=B, C=C, H=H, W=W, mlp_ratio=ratio),
                            dtype=amp_dtype_name(cfg), variants=variants,
                            cost=roofline.block_cost(B, C, H, W, ratio, cfg.dtype, backward)))
    return out, list(dict.fromkeys(notes))
