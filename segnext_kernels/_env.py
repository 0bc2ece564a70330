"""Environment flags, read in one place.

SEGNEXT_BACKEND      default backend name ("auto", "reference", "triton", "cuda", "cpu").
SEGNEXT_DISABLE_C    if "1", do not load the compiled extension (useful to test the fallback).
TRITON_INTERPRET     if "1", Triton kernels run on the CPU through Triton's interpreter.
SEGNEXT_CHECK_INPUTS if "1", ops also check input values (nmf2d: x, bases non-negative and finite);
                     off by default: a value check waits for the GPU on every call.
"""
from __future__ import annotations

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


DEFAULT_BACKEND: str = os.environ.get("SEGNEXT_BACKEND", "auto").strip().lower() or "auto"
DISABLE_C: bool = _flag("SEGNEXT_DISABLE_C")


def triton_interpret() -> bool:
    """Read at call time: tests set it before importing kernels, but after this module."""
    return _flag("TRITON_INTERPRET")


def check_inputs() -> bool:
    """SEGNEXT_CHECK_INPUTS, read at call time (a debug switch, flipped by tests)."""
    return _flag("SEGNEXT_CHECK_INPUTS")
