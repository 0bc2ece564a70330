"""Environment flags, read in one place.

SEGNEXT_BACKEND      default backend name ("auto", "reference", "triton", "cuda", "cpu"); an
                     unknown or unavailable name makes every op call raise until it is fixed.
SEGNEXT_DISABLE_C    if "1", do not load the compiled extension (useful to test the fallback).
SEGNEXT_VERIFY       "0" turns off the one-time check of each fused kernel against the reference
                     before its first use on a device (default: on).
TRITON_INTERPRET     if "1", Triton kernels run on the CPU through Triton's interpreter.
SEGNEXT_CHECK_INPUTS if "1", ops also check input values (nmf2d: x, bases non-negative and finite);
                     off by default: a value check waits for the GPU on every call.
SEGNEXT_POISON       if "1" (tests), kernels fill their outputs with NaN before computing, so an
                     element a kernel leaves unwritten fails the comparison with the reference.
                     One name for Python, Triton and C++: the C++ kernels get it when _C loads
                     (_extension.set_poison, which tests also call to flip it).
"""
from __future__ import annotations

import os


def _flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


# Kept as given (not normalised): a misspelt name is refused with the same message as in
# ``set_backend``.
DEFAULT_BACKEND: str = os.environ.get("SEGNEXT_BACKEND") or "auto"  # set but empty: unset
DISABLE_C: bool = _flag("SEGNEXT_DISABLE_C")


def verify() -> bool:
    """Read at call time, so that tests can switch it with monkeypatch.setenv."""
    return _flag("SEGNEXT_VERIFY", default=True)


def triton_interpret() -> bool:
    """Read at call time: tests set it before importing kernels, but after this module."""
    return _flag("TRITON_INTERPRET")


def check_inputs() -> bool:
    """SEGNEXT_CHECK_INPUTS, read at call time (a debug switch, flipped by tests)."""
    return _flag("SEGNEXT_CHECK_INPUTS")


def poison() -> bool:
    """SEGNEXT_POISON, read at call time (_extension hands it to _C when it loads it)."""
    return _flag("SEGNEXT_POISON")
