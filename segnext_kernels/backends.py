"""Backends: their names, whether each is available here, and the selected one.

| backend     | runs on                                    |
|-------------|--------------------------------------------|
| reference   | anywhere (pure PyTorch, the specification) |
| triton      | CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 |
| cuda        | CUDA tensors, when ``_C`` was built with CUDA |
| cpu         | CPU tensors, when ``_C`` is loaded         |

Which kernel runs a given call is decided by ``segnext_kernels.dispatch.select``; this module
only validates names (the same rules and messages for ``set_backend``, ``use_backend``, the
per-call ``backend=`` and ``SEGNEXT_BACKEND``) and keeps the selection.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator, NamedTuple

import torch

from . import _env, _extension

BACKENDS = ("reference", "triton", "cuda", "cpu")
CHOICES = ("auto",) + BACKENDS

# The devices each backend's kernels run on ("reference" runs on any device).
DEVICES = {"triton": ("cuda",), "cuda": ("cuda",), "cpu": ("cpu",)}

# Largest shared-memory tile of the CUDA MSCA kernels, in bytes; _C reports it when built with
# CUDA (``cuda_smem_bytes`` in its build info).
_CUDA_SMEM_FALLBACK = 160 * 1024


class BackendStatus(NamedTuple):
    available: bool
    reason: str


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton is not importable ({type(exc).__name__}: {exc}); `pip install triton`"
    return None


@functools.lru_cache(maxsize=None)
def _status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(True, "pure PyTorch, always available")
    if name == "triton":
        err = _triton_import_error()
        if err:
            return BackendStatus(False, err)
        if torch.cuda.is_available():
            return BackendStatus(True, f"CUDA GPU: {torch.cuda.get_device_name()}")
        if _env.triton_interpret():
            return BackendStatus(True, "TRITON_INTERPRET=1: Triton's CPU interpreter (slow; tests)")
        return BackendStatus(False, "no CUDA GPU visible and TRITON_INTERPRET is not set to 1")
    if name == "cpu":
        if not _extension.available():
            return BackendStatus(False, _extension.unavailable_reason())
        return BackendStatus(True, "compiled C++ CPU kernels in segnext_kernels._C")
    if name == "cuda":
        if not _extension.available():
            return BackendStatus(False, _extension.unavailable_reason())
        if not _extension.has_cuda():
            return BackendStatus(False, "segnext_kernels._C was built without CUDA "
                                 "(rebuild with a CUDA build of torch and nvcc, SEGNEXT_CUDA=1)")
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA GPU visible")
        need = int(_extension.build_info().get("cuda_smem_bytes", _CUDA_SMEM_FALLBACK))
        smem = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                       "shared_memory_per_block_optin", None)
        if smem is not None and smem < need:
            return BackendStatus(False, f"the CUDA MSCA kernels need {need // 1024} KB of "
                                 f"shared memory per block (A100/H100 class); this GPU allows "
                                 f"{smem // 1024} KB: use the triton backend")
        return BackendStatus(True, f"CUDA C++ kernels in segnext_kernels._C on {torch.cuda.get_device_name()}")
    raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")


def available_backends() -> Dict[str, BackendStatus]:
    """Each backend with whether it is available here and why (not)."""
    return {name: _status(name) for name in BACKENDS}


def is_available(name: str) -> bool:
    return _status(name).available


def check_name(name) -> str:
    """``name`` itself if it is a backend name that can run here; else a clear error.

    Names are exact (``"cpu"``, not ``"CPU"`` or ``" cpu"``): one spelling, one meaning.
    """
    if not isinstance(name, str) or name not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")
    if name != "auto":
        st = _status(name)
        if not st.available:
            raise RuntimeError(f"backend {name!r} is not available: {st.reason}")
    return name


def runs_on(name: str, device_type: str) -> bool:
    """Whether backend ``name``'s kernels can take tensors of ``device_type``."""
    if name in ("auto", "reference"):
        return True
    if name == "triton" and device_type == "cpu":
        return _env.triton_interpret()
    return device_type in DEVICES[name]


def device_error(name: str, op: str, device) -> ValueError:
    where = "CPU tensors only under TRITON_INTERPRET=1" if name == "triton" else \
        " and ".join(DEVICES[name]) + " tensors"
    return ValueError(f"backend {name!r} cannot run {op} on a tensor on {device}: it runs on "
                      f"{where}; select a backend for {device} (or 'auto', or 'reference')")


# The selection is a plain module global (not a ContextVar) so that torch.compile can read it
# while tracing, and guard on it: changing the backend recompiles instead of breaking the graph.
# None means "not set": SEGNEXT_BACKEND (validated at every use until it is valid), else auto.
_current: str | None = None


def get_backend() -> str:
    """The selected backend name (``auto`` unless set by ``set_backend``/``use_backend`` or
    ``SEGNEXT_BACKEND``)."""
    if _current is not None:
        return _current
    try:
        return check_name(_env.DEFAULT_BACKEND)
    except (ValueError, RuntimeError) as exc:
        raise type(exc)(f"SEGNEXT_BACKEND: {exc}") from None


def set_backend(name: str) -> None:
    """Select the backend for all following calls (``auto`` restores the default)."""
    global _current
    _current = check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """``with use_backend("triton"): ...`` runs the ops in the block with that backend."""
    global _current
    chosen = check_name(name)
    previous = _current
    _current = chosen
    try:
        yield chosen
    finally:
        _current = previous
