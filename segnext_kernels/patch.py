"""``patch(model)``: swap every MSCA-shaped module, MLP-shaped module and NMF2D of any model for ours.

A module is "structurally an MSCA" when it has the official AttentionModule / MSCAAttention
attribute layout: depthwise ``nn.Conv2d`` children ``conv0`` (5×5), ``conv0_1``/``conv0_2``
(1×7, 7×1), ``conv1_1``/``conv1_2`` (1×11, 11×1), ``conv2_1``/``conv2_2`` (1×21, 21×1) with
bias, 'same' padding, stride 1, and a dense 1×1 ``conv3`` with bias. The replacement adopts the
same ``nn.Conv2d`` children, so parameters stay the very same objects (an optimizer built before
patching keeps working), with their device, dtype and ``requires_grad``; training mode is kept.

A module is "structurally an MSCAN MLP" when it has the official ``Mlp`` layout: a 1x1
``fc1`` (C -> hidden, bias), a ``dwconv`` that is (or wraps, as ``DWConv.dwconv``) a depthwise
3x3 conv with bias and 'same' padding, an exact ``nn.GELU`` ``act``, a 1x1 ``fc2`` (hidden -> C,
bias) and an optional ``nn.Dropout`` ``drop``; it becomes a ``FusedMlp`` holding the same
children.

An NMF2D is a module whose class is named ``NMF2D`` with the attributes of the official
``_MatrixDecomposition2DBase`` (S, R, train_steps, eval_steps, inv_t) and random bases
(``rand_init`` true or absent). ``unpatch(model)`` puts the original modules back.
"""
from __future__ import annotations

from typing import List, NamedTuple

from torch import nn

from .mlp.module import FusedMlp, depthwise_conv
from .msca.module import MSCA
from .msca.reference import DW_CONVS
from .nmf2d.module import NMF2D
from .nmf2d.reference import GRAD_MODES


class Replacement(NamedTuple):
    name: str       # qualified name of the module in the model
    original: str   # class name of what was there
    new: str        # class name of what is there now


def _is_msca_like(m: nn.Module) -> bool:
    if isinstance(m, MSCA):
        return False
    conv3 = getattr(m, "conv3", None)
    if not isinstance(conv3, nn.Conv2d):
        return False
    C = conv3.in_channels
    if conv3.out_channels != C or conv3.kernel_size != (1, 1) or conv3.groups != 1 or conv3.bias is None:
        return False
    for name, (kh, kw) in DW_CONVS:
        conv = getattr(m, name, None)
        if not isinstance(conv, nn.Conv2d):
            return False
        if (conv.in_channels, conv.out_channels, conv.groups) != (C, C, C) or conv.bias is None:
            return False
        if conv.kernel_size != (kh, kw) or conv.padding != (kh // 2, kw // 2):
            return False
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            return False
    return True


def _is_conv(conv, cin: int, cout: int, k: int, groups: int = 1) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.in_channels == cin and conv.out_channels == cout
            and conv.kernel_size == (k, k) and conv.groups == groups and conv.bias is not None
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding == (k // 2, k // 2)
            and conv.padding_mode == "zeros")


_MLP_CHILDREN = {"fc1", "dwconv", "act", "fc2", "drop"}


def _holds_only(m: nn.Module, children) -> bool:
    """No parameters or buffers of its own, and no children but ``children``."""
    return (not any(True for _ in m.parameters(recurse=False))
            and not any(True for _ in m.buffers(recurse=False))
            and set(dict(m.named_children())) <= set(children))


def _is_mlp_like(m: nn.Module) -> bool:
    if getattr(type(m), "_segnext_fused_mlp", False):
        return False  # ours (FusedMlp, segnext.mscan.Mlp): already fused
    if not _holds_only(m, _MLP_CHILDREN):
        return False  # more than the official MLP: its forward may do more than ours
    fc1, fc2, act = getattr(m, "fc1", None), getattr(m, "fc2", None), getattr(m, "act", None)
    dwconv, drop = getattr(m, "dwconv", None), getattr(m, "drop", None)
    if not isinstance(fc1, nn.Conv2d) or not isinstance(dwconv, nn.Module):
        return False
    C, hidden = fc1.in_channels, fc1.out_channels
    if not (_is_conv(fc1, C, hidden, 1) and _is_conv(fc2, hidden, C, 1)):
        return False
    conv = dwconv if isinstance(dwconv, nn.Conv2d) else getattr(dwconv, "dwconv", None)
    if not _is_conv(conv, hidden, hidden, 3, groups=hidden):
        return False
    if type(dwconv) is not nn.Conv2d and not _holds_only(dwconv, {"dwconv"}):
        return False  # a wrapper that does more than hold the conv
    if type(act) is not nn.GELU or act.approximate != "none":
        return False
    return drop is None or type(drop) in (nn.Dropout, nn.Identity)


def _adopt_mlp(old: nn.Module) -> FusedMlp:
    new = FusedMlp(old.fc1, old.dwconv, old.act, old.fc2, getattr(old, "drop", None))
    new.train(old.training)
    object.__setattr__(new, "_segnext_original", old)  # not a submodule: no duplicate keys
    return new


def _is_nmf2d_like(m: nn.Module) -> bool:
    if isinstance(m, NMF2D) or type(m).__name__ != "NMF2D":
        return False
    needed = ("S", "R", "train_steps", "eval_steps", "inv_t")
    return all(hasattr(m, a) for a in needed) and bool(getattr(m, "rand_init", True))


def _adopt_msca(old: nn.Module) -> MSCA:
    new = MSCA.__new__(MSCA)
    nn.Module.__init__(new)
    new.channels = old.conv3.in_channels
    for name, _ in DW_CONVS + (("conv3", None),):
        setattr(new, name, getattr(old, name))
    new.train(old.training)
    object.__setattr__(new, "_segnext_original", old)  # not a submodule: no duplicate keys
    return new


def _adopt_nmf2d(old: nn.Module, grad: str) -> NMF2D:
    new = NMF2D(S=int(old.S), R=int(old.R), train_steps=int(old.train_steps),
                eval_steps=int(old.eval_steps), inv_t=float(old.inv_t), grad=grad)
    new.train(old.training)
    object.__setattr__(new, "_segnext_original", old)  # not a submodule: no duplicate keys
    return new


def _swap(model: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def patch(model: nn.Module, *, msca: bool = True, mlp: bool = True, nmf: bool = True,
          nmf_grad: str = "unrolled") -> List[Replacement]:
    """Replace MSCA-, MLP- and NMF2D modules of ``model`` in place; returns what changed.

    ``nmf_grad`` picks the gradient mode of the replacement NMF2D ("unrolled" matches the
    official training). The model itself, when it is such a module, cannot be replaced in place:
    wrap it, or use the returned module of ``MSCA``/``NMF2D`` directly.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for flag, value in (("msca", msca), ("mlp", mlp), ("nmf", nmf)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be True or False, got {value!r}")
    if nmf_grad not in GRAD_MODES:
        raise ValueError(f"nmf_grad must be one of {GRAD_MODES}, got {nmf_grad!r}")
    done: List[Replacement] = []
    for name, m in list(model.named_modules()):
        if not name:
            continue
        if msca and _is_msca_like(m):
            _swap(model, name, _adopt_msca(m))
            done.append(Replacement(name, type(m).__name__, "MSCA"))
        elif mlp and _is_mlp_like(m):
            _swap(model, name, _adopt_mlp(m))
            done.append(Replacement(name, type(m).__name__, "FusedMlp"))
        elif nmf and _is_nmf2d_like(m):
            _swap(model, name, _adopt_nmf2d(m, nmf_grad))
            done.append(Replacement(name, type(m).__name__, "NMF2D"))
    return done


def unpatch(model: nn.Module) -> List[Replacement]:
    """Put back every module that ``patch`` replaced; returns what changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    done: List[Replacement] = []
    for name, m in list(model.named_modules()):
        original = getattr(m, "_segnext_original", None)
        if name and original is not None:
            original.train(m.training)
            _swap(model, name, original)
            done.append(Replacement(name, type(m).__name__, type(original).__name__))
    return done
