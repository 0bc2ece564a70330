"""Argument checks of the model, data and metrics: errors that name the argument and what was
expected (segnext_kernels checks its ops' arguments itself)."""
from __future__ import annotations

import math
from typing import Sequence

import torch


def check_int(name: str, value, minimum: int) -> int:
    """An int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_ints(name: str, values, minimum: int) -> tuple:
    """A sequence of ints >= ``minimum``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must hold ints >= {minimum}, got {tuple(values)!r}")
    return tuple(values)


def check_real(name: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite real number (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def check_probability(name: str, value) -> float:
    return check_real(name, value, 0.0, 1.0)


def check_image_batch(name: str, x, channels: int) -> torch.Tensor:
    """A non-empty floating-point (B, channels, H, W) tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must have shape (B, {channels}, H, W), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (normalised image), got "
                        f"{x.dtype}")
    return x
