"""Backend selection: which implementation runs an op.

| backend     | runs on                                    |
|-------------|--------------------------------------------|
| reference   | anywhere (pure PyTorch, the specification) |
| triton      | CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 |
| cuda        | CUDA tensors, when ``_C`` was built with CUDA |
| cpu         | CPU tensors, when ``_C`` is loaded         |

``auto`` (the default) picks, per call, the fastest backend that is available, runs on the
tensor's device and implements the op. An explicitly chosen backend that does not implement an
op (e.g. ``cpu`` for ``nmf2d``) runs that op with the reference; ``op_backends()`` tells which.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator, NamedTuple

import torch

from . import _env, _extension

BACKENDS = ("reference", "triton", "cuda", "cpu")
_CHOICES = ("auto",) + BACKENDS

# Which backends implement which op; each op module fills in its row.
_OP_BACKENDS: Dict[str, set] = {}

# Preference order of ``auto`` per device type.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


# Largest shared-memory tile of the CUDA MSCA kernels (csrc/cuda/msca_cuda.cu), in bytes.
_CUDA_SMEM_NEEDED = 160 * 1024


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def register_op(op: str, backends) -> None:
    _OP_BACKENDS[op] = set(backends) | {"reference"}


def op_backends() -> Dict[str, tuple]:
    """For each op, the backends that have a kernel for it."""
    return {op: tuple(b for b in BACKENDS if b in bs) for op, bs in _OP_BACKENDS.items()}


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
        smem = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()),
                       "shared_memory_per_block_optin", None)
        if smem is not None and smem < _CUDA_SMEM_NEEDED:
            return BackendStatus(False, f"the CUDA MSCA kernels need {_CUDA_SMEM_NEEDED // 1024} KB of "
                                 f"shared memory per block (A100/H100 class); this GPU allows "
                                 f"{smem // 1024} KB: use the triton backend")
        return BackendStatus(True, f"CUDA C++ kernels in segnext_kernels._C on {torch.cuda.get_device_name()}")
    raise ValueError(f"unknown backend {name!r}; expected one of {_CHOICES}")


def available_backends() -> Dict[str, BackendStatus]:
    """Each backend with whether it is available here and why (not)."""
    return {name: _status(name) for name in BACKENDS}


def _check_name(name) -> str:
    if not isinstance(name, str) or name.strip().lower() not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
    name = name.strip().lower()
    if name != "auto":
        st = _status(name)
        if not st.available:
            raise RuntimeError(f"backend {name!r} is not available: {st.reason}")
    return name


# The selection is a plain module global (not a ContextVar) so that torch.compile can read it
# while tracing, and guard on it: changing the backend recompiles instead of breaking the graph.
_current: str = "auto"
_default_checked = False


def get_backend() -> str:
    """The selected backend name (``auto`` unless set)."""
    global _default_checked, _current
    if not _default_checked:  # SEGNEXT_BACKEND is validated on first use, not at import
        _default_checked = True
        if _env.DEFAULT_BACKEND != "auto":
            _current = _check_name(_env.DEFAULT_BACKEND)
    return _current


def set_backend(name: str) -> None:
    """Select the backend for all following calls (``auto`` restores the default)."""
    global _current
    get_backend()
    _current = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """``with use_backend("triton"): ...`` runs the ops in the block with that backend."""
    global _current
    previous = get_backend()
    _current = _check_name(name)
    try:
        yield _current
    finally:
        _current = previous


def _runs_on(name: str, device_type: str) -> bool:
    if name == "reference":
        return True
    if name == "triton":
        return device_type == "cuda" or (device_type == "cpu" and _env.triton_interpret())
    return device_type == name  # "cuda" and "cpu" backends are named after their device


@torch.compiler.assume_constant_result
def _resolve(op: str, device_type: str, name: str) -> str:
    # A constant for torch.compile: evaluated once while tracing (availability probes import
    # modules and query the driver, which must not be traced).
    implemented = _OP_BACKENDS.get(op, {"reference"})
    if name == "auto":
        for cand in _AUTO_ORDER.get(device_type, ("reference",)):
            if cand in implemented and _status(cand).available:
                return cand
        return "reference"
    if not _runs_on(name, device_type):
        return ""
    return name if name in implemented else "reference"


def resolve(op: str, device: torch.device) -> str:
    """The backend that runs ``op`` on a tensor on ``device`` now."""
    name = get_backend()
    chosen = _resolve(op, device.type, name)
    if not chosen:
        raise ValueError(f"backend {name!r} cannot run {op} on a tensor on {device}; "
                         f"select a backend for that device or 'auto'")
    return chosen
