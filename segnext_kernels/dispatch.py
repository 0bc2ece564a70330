"""Which kernel runs a call: one selection path for every op.

``select(problem, backend)`` is the only place that turns (op, the call's tensors, the requested
backend) into the name of the backend whose kernel runs. The rules, the same for the per-call
``backend=``, ``use_backend``, ``set_backend`` and ``SEGNEXT_BACKEND``:

- an unknown name raises ``ValueError``; a backend that cannot run here raises ``RuntimeError``
  saying why (``segnext_kernels.backends.check_name``);
- an explicit backend whose kernels cannot take tensors on the call's device raises, naming both;
- an explicit backend without a kernel for the op, or whose kernel does not take this call (its
  dtype, memory format, a gradient it has no backward for, a size limit: the op's ``Kernel``
  entry in ``segnext_kernels.kernels``), runs the reference;
- ``auto`` takes, in the device's order (``AUTO_ORDER``), the first backend that is available,
  has a kernel that takes the call, is measured faster than the reference for it (the kernel's
  ``faster`` rule), and has passed its check;
- a fused kernel is used on a device only after it has passed a one-time check against the
  reference there (``segnext_kernels.selftest``), per op, backend, dtype and memory format:
  forward and every gradient on a few small odd shapes. The result is cached for the process;
  a failure is reported once (a warning with the error figures) and the call runs the next
  backend in the order. ``SEGNEXT_VERIFY=0`` turns the check off.

Under ``torch.compile`` the choice is made while tracing, from shapes and cached facts: the
availability and check results enter the graph as constants (a check that has not run yet runs
then, once, on small tensors of its own).

``record_kernels()`` counts which kernel ran, so that tests can prove the fast path ran.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from . import _env, backends

# Preference order of ``auto`` per device type. Triton runs on CPU tensors only under the
# interpreter, which is for tests: ``auto`` never picks it there.
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


@dataclass(frozen=True)
class Problem:
    """What a kernel needs to know about a call to decide whether it takes it."""
    op: str
    device: torch.device
    dtype: torch.dtype
    layout: str                 # "contiguous" or "channels_last"
    shape: Tuple[int, ...]      # of the op's main input
    grad: bool                  # autograd will need this op's backward
    sizes: Tuple[Tuple[str, int], ...] = ()  # op-specific sizes (e.g. R of nmf2d)

    def size(self, name: str) -> int:
        return dict(self.sizes)[name]


@dataclass(frozen=True)
class Kernel:
    """One backend's kernel for one op, and what it takes."""
    op: str
    backend: str
    dtypes: Tuple[torch.dtype, ...]
    layouts: Tuple[str, ...] = ("contiguous", "channels_last")
    backward: bool = True
    present: bool = True                                  # built into this install
    limits: Optional[Callable[[Problem], Optional[str]]] = None  # why it cannot take a call
    device_limits: Optional[Callable[[str, torch.dtype], Optional[str]]] = None  # per device type
    faster: Optional[Callable[[Problem], bool]] = None    # auto: beats the reference here
    note: str = ""                                        # where ``faster`` comes from

    def config_refusal(self, device_type: str, dtype: torch.dtype, layout: str) -> Optional[str]:
        """Why this kernel has no code for this device type, dtype and layout, or None."""
        if dtype not in self.dtypes:
            return f"no {dtype} kernel"
        if layout not in self.layouts:
            return f"no {layout} kernel"
        return self.device_limits(device_type, dtype) if self.device_limits is not None else None

    def refusal(self, p: Problem) -> Optional[str]:
        """Why this kernel cannot take the call, or None."""
        why = self.config_refusal(p.device.type, p.dtype, p.layout)
        if why is not None:
            return why
        if p.grad and not self.backward:
            return "no backward (inference only)"
        return self.limits(p) if self.limits is not None else None

    def is_faster(self, p: Problem) -> bool:
        return True if self.faster is None else bool(self.faster(p))


_KERNELS: Dict[Tuple[str, str], Kernel] = {}


def register(kernel: Kernel) -> None:
    _KERNELS[(kernel.op, kernel.backend)] = kernel


def kernel(op: str, backend: str) -> Optional[Kernel]:
    k = _KERNELS.get((op, backend))
    return k if k is not None and k.present else None


def ops() -> Tuple[str, ...]:
    seen = []
    for op, _ in _KERNELS:
        if op not in seen:
            seen.append(op)
    return tuple(seen)


def op_backends() -> Dict[str, tuple]:
    """For each op, the backends that have a kernel for it in this install."""
    return {op: tuple(b for b in backends.BACKENDS
                      if b == "reference" or kernel(op, b) is not None) for op in ops()}


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------

@torch.compiler.assume_constant_result
def _requested(name: str) -> str:
    # A constant for torch.compile: availability probes import modules and query the driver.
    return backends.check_name(name)


@torch.compiler.assume_constant_result
def _trusted(op: str, backend: str, device: str, dtype: torch.dtype, layout: str) -> bool:
    return trusted(op, backend, torch.device(device), dtype, layout)


def _usable(k: Kernel, p: Problem) -> bool:
    return _trusted(k.op, k.backend, str(p.device), p.dtype, p.layout)


def select(problem: Problem, backend: Optional[str] = None) -> str:
    """The backend whose kernel runs ``problem``: see the module docstring for the rules."""
    name = _requested(backends.get_backend() if backend is None else backend)
    dev = problem.device.type
    if name == "auto":
        for cand in AUTO_ORDER.get(dev, ()):
            k = kernel(problem.op, cand)
            if (k is None or not _requested_ok(cand) or k.refusal(problem) is not None
                    or not k.is_faster(problem)):
                continue
            if _usable(k, problem):
                return cand
        return "reference"
    if not backends.runs_on(name, dev):
        raise backends.device_error(name, problem.op, problem.device)
    if name == "reference":
        return name
    k = kernel(problem.op, name)
    if k is None or k.refusal(problem) is not None:
        return "reference"
    return name if _usable(k, problem) else "reference"


@torch.compiler.assume_constant_result
def _requested_ok(name: str) -> bool:
    return backends.is_available(name)


def explain(problem: Problem, backend: Optional[str] = None) -> str:
    """One line per candidate saying why it was or was not taken (for users and bug reports)."""
    name = backends.get_backend() if backend is None else backend
    lines = [f"{problem.op} on {problem.device} ({problem.dtype}, {problem.layout}, "
             f"shape {tuple(problem.shape)}, grad {problem.grad}), requested {name!r}:"]
    cands = AUTO_ORDER.get(problem.device.type, ()) if name == "auto" else (name,)
    for cand in cands:
        k = kernel(problem.op, cand)
        if cand == "reference":
            why = "the reference"
        elif k is None:
            why = "no kernel for this op"
        elif not backends.is_available(cand):
            why = f"unavailable: {backends.available_backends()[cand].reason}"
        elif k.refusal(problem):
            why = f"does not take this call: {k.refusal(problem)}"
        elif name == "auto" and not k.is_faster(problem):
            why = f"slower than the reference here ({k.note or 'measured'})"
        else:
            st = status(problem.op, cand, problem.device, problem.dtype, problem.layout)
            why = ("unchecked" if st is None else
                   "checked: passed" if st.ok else f"checked: FAILED ({st.detail})")
        lines.append(f"  {cand}: {why}")
    lines.append(f"  -> {select(problem, backend)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# checked before trusted
# --------------------------------------------------------------------------------------------

@dataclass
class CheckResult:
    ok: bool
    max_err: float          # worst relative error over the outputs and gradients checked
    tol: float
    seconds: float
    detail: str = ""        # the failing tensor and shape, or the exception


_results: Dict[tuple, CheckResult] = {}
_lock = threading.RLock()
_checking = threading.local()


def _key(op, backend, device, dtype, layout) -> tuple:
    return (op, backend, str(device), dtype, layout)


def status(op: str, backend: str, device, dtype, layout: str) -> Optional[CheckResult]:
    """The cached check result for this kernel configuration, or None if it has not run."""
    return _results.get(_key(op, backend, torch.device(device), dtype, layout))


def trusted(op: str, backend: str, device: torch.device, dtype: torch.dtype, layout: str) -> bool:
    """Whether the kernel has passed (or now passes) its check for this configuration."""
    if backend == "reference" or not _env.verify():
        return True
    key = _key(op, backend, device, dtype, layout)
    res = _results.get(key)
    if res is None:
        with _lock:
            res = _results.get(key)
            if res is None:
                res = run_check(op, backend, device, dtype, layout)
                if not res.ok:
                    warnings.warn(
                        f"segnext_kernels: the {backend} kernel of {op} failed its check against "
                        f"the reference on {device} ({dtype}, {layout}): {res.detail}; max "
                        f"relative error {res.max_err:.3g} (tolerance {res.tol:.0e}). It is not "
                        f"used: {op} runs the next backend instead. `python -m "
                        f"segnext_kernels.selftest` shows every check.", RuntimeWarning,
                        stacklevel=2)
    return res.ok


def run_check(op: str, backend: str, device, dtype, layout: str) -> CheckResult:
    """Run (again) the check of one kernel configuration and cache its result."""
    from . import selftest  # noqa: PLC0415 - imports every op's reference

    device = torch.device(device)
    _checking.active = True
    try:
        res = selftest.check(op, backend, device, dtype, layout)
    finally:
        _checking.active = False
    _results[_key(op, backend, device, dtype, layout)] = res
    return res


def reset_checks() -> None:
    """Forget every check result (tests)."""
    with _lock:
        _results.clear()


# --------------------------------------------------------------------------------------------
# which kernel ran
# --------------------------------------------------------------------------------------------

_recorders: list = []


def ran(op: str, backend: str) -> None:
    """Called where a kernel runs (the custom op bodies, the reference paths)."""
    if _recorders and not getattr(_checking, "active", False):
        for counter in _recorders:
            counter[(op, backend)] += 1


@contextlib.contextmanager
def record_kernels() -> Iterator[collections.Counter]:
    """Count the kernels that run inside the block: ``{(op, backend): calls}``.

    Fused kernels are counted when they run (also inside a ``torch.compile``d graph); the
    reference is counted per eager call. The checks' own runs are not counted.
    """
    counter: collections.Counter = collections.Counter()
    _recorders.append(counter)
    try:
        yield counter
    finally:
        _recorders.remove(counter)


def layout_of(t: torch.Tensor) -> str:
    """"channels_last" when a 4-D ``t`` is laid out channels-last and not also contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "contiguous"


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


__all__ = ["Problem", "Kernel", "register", "kernel", "op_backends", "select", "explain",
           "trusted", "status", "run_check", "reset_checks", "record_kernels", "ran",
           "CheckResult", "AUTO_ORDER", "layout_of", "needs_grad"]
