"""Helpers shared by the test modules (pytest puts tests/ on sys.path: ``from utils import ...``).

- ``rel_err``: the error measure of the kernel tests, max |x - ref| / max |ref|; ``check_close``,
  ``check_all_close``: shape, finiteness and that error within a tolerance.
- ``output_and_grads`` / ``msca_reference``: an op's output and gradients (the specification's
  in float64).
- ``msca_inputs``: seeded random MSCA inputs (u, the 16 weights, an output gradient).
- ``run_poisoned``: a script in a fresh interpreter with ``SEGNEXT_POISON=1``; ``poisoned_inputs``:
  the inputs such scripts sweep.
- ``one_line_error``: the one-line usage error of a refused command line.
- ``MMSEG_WARNINGS`` / ``ignore_mmseg_warnings``: the warning filters of the tests that build
  mmseg's models (a module's ``pytestmark`` / a test's decorator).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from segnext_kernels.msca.reference import msca_ref, weight_shapes

TESTS = os.path.dirname(os.path.abspath(__file__))
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| in float64, or max |x - ref| where ref is all zero; NaN when x
    holds a NaN (e.g. an element a kernel did not write, poisoned as NaN): compare as
    ``rel_err(...) <= tol``."""
    x, ref = x.detach().double(), ref.detach().double()
    diff, scale = (x - ref).abs().max(), ref.abs().max()
    return (diff / scale).item() if scale > 0 else diff.item()


def check_close(name: str, x: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """``x`` against ``ref``: the same shape, finite everywhere (an element a kernel did not write
    is NaN under poisoning), ``rel_err`` within ``tol``."""
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values (an element was not written?)"
    err = rel_err(x, ref)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


def check_all_close(names, got, want, tol: float, what: str = "") -> None:
    """``check_close`` of each tensor of ``got`` against the one of ``want``, named by ``names``."""
    assert len(got) == len(want)
    for name, x, ref in zip(names, got, want):
        check_close(f"{what} {name}", x, ref, tol)


def output_and_grads(fn, inputs, grad: torch.Tensor, dtype: torch.dtype | None = None,
                     allow_unused: bool = False) -> list:
    """``[out, d inputs[0], d inputs[1], ...]``: ``fn`` run on detached copies of ``inputs``
    (cast to ``dtype`` when given), its output (detached) and the gradient of every input for the
    output gradient ``grad`` (None for an input ``fn`` does not use, with ``allow_unused``)."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
    leaves = [cast(t.detach()).requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, cast(grad), allow_unused=allow_unused)
    return [out.detach(), *grads]


def msca_reference(u: torch.Tensor, ws, grad: torch.Tensor) -> list:
    """``[out, grad_u, grad_w0, grad_b0, ..., grad_b3]`` of the MSCA specification in float64."""
    return output_and_grads(msca_ref, [u, *ws], grad, torch.float64)


def msca_inputs(B: int, C: int, H: int, W: int, dtype: torch.dtype = torch.float32,
                fmt: torch.memory_format = torch.contiguous_format, seed: int = 0,
                device="cpu"):
    """(u, the 16 weights, an output gradient) for MSCA: float32 draws from a generator seeded
    with ``seed`` (kernels x 0.3, biases x 0.1), cast to ``dtype`` on ``device``; u and the
    gradient in the memory format ``fmt``."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(B, C, H, W, generator=gen)
    ws = [torch.randn(s, generator=gen) * (0.3 if len(s) > 1 else 0.1) for s in weight_shapes(C)]
    grad = torch.randn(B, C, H, W, generator=gen)
    return (u.to(device, dtype).contiguous(memory_format=fmt), [w.to(device, dtype) for w in ws],
            grad.to(device, dtype).contiguous(memory_format=fmt))


def run_poisoned(script: str, timeout: float = 300) -> None:
    """Run ``script`` in a fresh interpreter with ``SEGNEXT_POISON=1`` in its environment (the
    way users set it): the kernels fill their outputs and scratch with NaN before computing, so
    an element a kernel does not write shows up. The script starts with torch, ``rel_err`` and
    ``poisoned_inputs`` imported; it must exit 0 and print "ok"."""
    path = [TESTS, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, SEGNEXT_POISON="1", PYTHONPATH=os.pathsep.join(path))
    code = "import torch\nfrom utils import poisoned_inputs, rel_err\n" + textwrap.dedent(script)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


# Odd shapes in both memory formats: a channel tail, a 2-row image, a 1x1 image.
POISONED_SHAPES = [((2, 17, 11, 23), torch.channels_last), ((1, 3, 2, 64), torch.contiguous_format),
                   ((1, 40, 33, 7), torch.channels_last), ((1, 1, 1, 1), torch.contiguous_format)]


def poisoned_inputs(shapes=POISONED_SHAPES):
    """For the scripts of ``run_poisoned``: for each ((B, C, H, W), memory format) of ``shapes``
    and each of float32, bfloat16 and float64, ``(x, dtype)`` with x ~ N(0, 1) of that shape,
    dtype and format (torch seeded with 0 first)."""
    torch.manual_seed(0)
    for shape, fmt in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            yield torch.randn(shape).to(dtype).contiguous(memory_format=fmt), dtype


def one_line_error(capsys, prefix: str, *fragments: str) -> str:
    """The single stderr line of a refused command, checked to start with ``prefix: error:``
    and to hold every fragment."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prefix}: error: "), lines[0]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# mmseg/mmengine/mmcv's own deprecation notes and "draw is False"-style messages
MMSEG_WARNINGS = [pytest.mark.filterwarnings(f"ignore::{kind}:{lib}")
                  for kind in ("UserWarning", "DeprecationWarning", "FutureWarning")
                  for lib in (r"mmseg\b.*", r"mmengine\b.*", r"mmcv\b.*")] + [
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")]


def ignore_mmseg_warnings(test):
    """``MMSEG_WARNINGS`` on one test."""
    for mark in MMSEG_WARNINGS:
        test = mark(test)
    return test
