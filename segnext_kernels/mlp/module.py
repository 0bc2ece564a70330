"""``FusedMlp``: drop-in for the official MSCAN ``Mlp`` (fc1 -> dwconv 3x3 -> GELU -> dropout ->
fc2 -> dropout), running ``segnext_kernels.mlp``; what ``patch`` puts in place of one."""
from __future__ import annotations

from torch import nn

from .functional import mlp


def depthwise_conv(dwconv: nn.Module) -> nn.Conv2d:
    """The 3x3 conv of an MLP's ``dwconv`` child: the conv itself (mmseg 1.x) or the
    ``DWConv`` wrapper of the original release, whose conv is its ``dwconv``."""
    return dwconv if isinstance(dwconv, nn.Conv2d) else dwconv.dwconv


def mlp_forward(module: nn.Module, x):
    """The forward of an official-layout MLP module (``fc1``, ``dwconv``, ``act``, ``fc2``,
    ``drop``) with the fused ops. Dropout with p > 0 in training keeps the module path, which
    has it in the right places."""
    drop = getattr(module, "drop", None)
    if module.training and isinstance(drop, nn.Dropout) and drop.p > 0:
        x = drop(module.act(module.dwconv(module.fc1(x))))
        return drop(module.fc2(x))
    conv = depthwise_conv(module.dwconv)
    return mlp(x, module.fc1.weight, module.fc1.bias, conv.weight, conv.bias,
               module.fc2.weight, module.fc2.bias)


class FusedMlp(nn.Module):
    """An official MLP's children (the very same modules and parameters) with the fused forward."""

    _segnext_fused_mlp = True

    def __init__(self, fc1: nn.Conv2d, dwconv: nn.Module, act: nn.Module, fc2: nn.Conv2d,
                 drop: nn.Module | None = None):
        super().__init__()
        for name, m in (("fc1", fc1), ("fc2", fc2)):
            if not isinstance(m, nn.Conv2d):
                raise TypeError(f"{name} must be an nn.Conv2d (1x1), got {type(m).__name__}")
        conv = dwconv if isinstance(dwconv, nn.Conv2d) else getattr(dwconv, "dwconv", None)
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"dwconv must be an nn.Conv2d or hold one as .dwconv, got "
                            f"{type(dwconv).__name__}")
        for name, m in (("act", act), ("drop", drop)):
            if m is not None and not isinstance(m, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(m).__name__}")
        self.fc1, self.dwconv, self.act, self.fc2 = fc1, dwconv, act, fc2
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, x):
        return mlp_forward(self, x)
