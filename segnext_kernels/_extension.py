"""Loader of the compiled extension ``segnext_kernels._C``.

``import segnext_kernels`` never fails because of it: if ``_C`` is missing or cannot be loaded
(built for another torch, say), the reason is kept, reported once as a warning, and the
``cpu``/``cuda`` backends report it as why they are unavailable.

``_C`` registers its kernels as the torch.library ops ``segnext_C::<op>_forward`` /
``<op>_backward`` (csrc/segnext_ops.cpp), apart from the public custom ops ``segnext::<op>`` of
ops.py that call them. Once loaded, it is told the flags it obeys (``SEGNEXT_POISON``, read in
_env.py): C++ reads no environment.
"""
from __future__ import annotations

import importlib
import warnings

from . import _env

REBUILD_HINT = "pip install --no-build-isolation -e ."

_C = None
_error: str | None = None
_warned = False


def _load() -> None:
    global _C, _error
    if _env.DISABLE_C:
        _error = "disabled by SEGNEXT_DISABLE_C=1"
        return
    try:
        import torch  # noqa: F401  (the extension links against libtorch: load it first)

        _C = importlib.import_module("segnext_kernels._C")
        _C.set_poison(_env.poison())  # (an AttributeError: a _C built from older sources)
    except Exception as exc:  # ImportError, OSError (undefined symbol), RuntimeError
        _C = None
        _error = f"{type(exc).__name__}: {exc}".strip()


def set_poison(flag: bool) -> None:
    """Output poisoning of the C++ kernels (``SEGNEXT_POISON``, handed over when ``_C`` loads):
    outputs start as NaN, so an element a kernel leaves unwritten shows up. Tests flip it here."""
    if _C is not None:
        _C.set_poison(bool(flag))


_load()


def available() -> bool:
    return _C is not None


def load_error() -> str | None:
    """Why ``_C`` is not loaded (None when it is)."""
    return _error


def unavailable_reason() -> str:
    return (f"the compiled extension segnext_kernels._C is not loaded ({_error}); "
            f"build it with `{REBUILD_HINT}` in the environment that runs torch")


def warn_once() -> None:
    global _warned
    if _C is None and not _warned and not _env.DISABLE_C:
        _warned = True
        warnings.warn(f"segnext_kernels: {unavailable_reason()}. The reference and Triton "
                      "backends still work.", RuntimeWarning, stacklevel=3)


def build_info() -> dict:
    """How ``_C`` was built (empty when it is not loaded)."""
    if _C is None:
        return {}
    return dict(_C.build_info())


def has_cuda() -> bool:
    return bool(build_info().get("with_cuda", False))


def require() :
    if _C is None:
        raise RuntimeError(unavailable_reason())
    return _C
