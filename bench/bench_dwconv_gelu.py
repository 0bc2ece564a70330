"""Level "dwconv_gelu": the depthwise 3x3 conv + bias + GELU of the MSCAN MLP, on its hidden
activation (4-8x the block's channels), forward and forward+backward (gradients of x, weight,
bias). Shapes and weights are the MLP level's (``bench_mlp``): the hidden activation of an
MSCAN stage's MLP.

Variants: the eager reference (``dwconv_gelu_ref``: oneDNN/cuDNN depthwise conv, then GELU) in
NCHW and channels_last — the baselines —, ``torch.compile`` of it (channels_last), and every
fused backend of the op (``cpu`` on CPU), both layouts.
"""
from __future__ import annotations

from functools import partial
from typing import List, Tuple

import torch

from . import roofline
from .bench_mlp import params, shapes
from .common import op_make, op_variants
from .runner import Case, Config


def _weights(C: int, hidden: int, cfg: Config, backward: bool) -> List[torch.Tensor]:
    """The dwconv weight and bias of an MSCAN MLP (``bench_mlp.params``)."""
    return params(C, hidden, cfg, requires_grad=backward)[2:4]


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    out, notes = [], []
    for B, C, H, W, ratio in shapes(cfg):
        for backward in (False, True):
            weights = partial(_weights, C, C * ratio, cfg, backward)
            make = op_make("dwconv_gelu", (B, C * ratio, H, W), weights, cfg, backward)
            variants, ns = op_variants("dwconv_gelu", cfg, make)
            notes += ns
            out.append(Case(level="dwconv_gelu", pass_="fwd+bwd" if backward else "fwd",
                            shape=f"dwconv_gelu B{B} C{C * ratio} {H}x{W}",
                            params=dict(op="dwconv_gelu", B=B, C=C, H=H, W=W, mlp_ratio=ratio),
                            dtype=cfg.dtype_name, variants=variants,
                            cost=roofline.dwconv_gelu_cost(B, C * ratio, H, W, cfg.dtype,
                                                           backward)))
    return out, list(dict.fromkeys(notes))
