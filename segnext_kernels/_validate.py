"""Input checks shared by the ops: clear errors naming the argument and what was expected."""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t, *, dim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    return t


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_same(ref_name: str, ref: torch.Tensor, named: Sequence[tuple]) -> None:
    """All tensors share ``ref``'s dtype and device."""
    for name, t in named:
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; "
                            "all tensors must share one dtype")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                             "all tensors must be on one device")


def is_channels_last(t: torch.Tensor) -> bool:
    """True when ``t`` (4-D) is laid out channels-last and not also plain contiguous."""
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def autocast_inputs(x: torch.Tensor, tensors):
    """Under autocast, compute as conv2d would: ``x`` and ``tensors`` in the autocast dtype."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return x.to(dt), [t.to(dt) for t in tensors]
    return x, list(tensors)


def check_one_device(op: str, named: Sequence[tuple]) -> None:
    """Every tensor of ``named`` ((name, tensor) pairs) on the first one's device.

    The ops' fakes must run it too: when one argument is on meta, the Meta kernel (the fake)
    wins the dispatch over the real kernel, and a fake that only returns ``empty_like`` would
    hand back an uninitialised tensor on the other arguments' device."""
    ref_name, ref = named[0]
    for name, t in named[1:]:
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                             "all tensors must be on one device")
