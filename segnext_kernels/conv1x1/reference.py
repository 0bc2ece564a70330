"""conv1x1 reference: the specification, in plain PyTorch (autograd by PyTorch).

y = act(conv2d(x, weight, bias)) + scale * residual: a 1x1 conv and the elementwise pass that
follows it in an MSCAN block (proj_1 and its GELU; proj_2 and the block's shortcut, whose
eval-mode norm and layer scale fold into a per-channel scale).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_ACTS = {"none": lambda t: t, "gelu": F.gelu, "relu": F.relu}


def conv1x1_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                act: str = "none", residual: Optional[torch.Tensor] = None,
                scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` (B, K, H, W), ``weight`` (N, K, 1, 1), ``bias`` (N,), ``residual`` (B, N, H, W),
    ``scale`` N values (default 1); ``act`` "none", "gelu" (exact erf) or "relu"."""
    y = _ACTS[act](F.conv2d(x, weight, bias))
    if residual is None:
        return y
    if scale is None:
        return y + residual
    return torch.addcmul(y, residual, scale.reshape(1, -1, 1, 1))
