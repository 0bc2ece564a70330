"""torch.library registration of every op, in one place.

Each op is a ``torch.library.custom_op`` with a hand-written fake (shapes and strides equal to
the real kernels') and a registered autograd formula, so it works under ``torch.compile``
(fullgraph), ``opcheck``, autocast (handled by the functional wrappers) and DDP. The backend name
is an argument of the op: the wrappers resolve it when they are called (at trace time under
``torch.compile``), and the op runs that backend's kernel.

Names: the public custom ops are ``segnext::<op>`` and ``segnext::<op>_backward``; the kernels
they call are ``<op>_forward`` / ``<op>_backward`` in every backend:
- triton: ``segnext_kernels.<op>.triton`` (Python module of Triton kernels, imported lazily);
- cpu / cuda: the C++ ops ``torch.ops.segnext_C.<op>_forward`` / ``<op>_backward`` of
  ``segnext_kernels._C``, one schema with CPU and CUDA implementations (csrc/segnext_ops.cpp),
  in a library of their own so that they never clash with the public ops.
"""
from __future__ import annotations

import importlib
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import _extension
from ._validate import check_one_device, memory_format_of
from .dispatch import ran
from .kernels import _cxx_kernel


def _one_device(op: str, named) -> None:
    # In the fakes too: with one argument on meta, the fake wins the dispatch and would answer
    # for a call no kernel can run with an uninitialised tensor.
    check_one_device(f"segnext::{op}", named)


def _cxx_one_device(op: str, named) -> None:
    check_one_device(f"segnext_C::{op}", named)


def _weights_named(weights, prefix="weights"):
    return [(f"{prefix}[{i}]", w) for i, w in enumerate(weights)]


# --------------------------------------------------------------------------------------------
# Fakes of the C++ kernels (segnext_C::*), so that they trace on their own too; the public ops
# below call them from their real implementations only.
# --------------------------------------------------------------------------------------------
def _register_cxx_fakes() -> None:
    if not _extension.available():
        return

    @torch.library.register_fake("segnext_C::strip_conv_forward")
    def _(x, weight, bias):
        _cxx_one_device("strip_conv_forward", [("x", x), ("weight", weight)]
                        + ([("bias", bias)] if bias is not None else []))
        return torch.empty_like(x)

    if _cxx_kernel("msca_forward", "CPU") or _cxx_kernel("msca_forward", "CUDA"):
        @torch.library.register_fake("segnext_C::msca_forward")
        def _(u, weights):
            _cxx_one_device("msca_forward", [("u", u)] + _weights_named(weights))
            return torch.empty_like(u)

        @torch.library.register_fake("segnext_C::msca_backward")
        def _(grad, u, weights):
            _cxx_one_device("msca_backward", [("u", u), ("grad", grad)] + _weights_named(weights))
            return [torch.empty_like(u)] + [torch.empty_like(w) for w in weights]

    if _cxx_kernel("dwconv_gelu_forward", "CPU"):
        @torch.library.register_fake("segnext_C::dwconv_gelu_forward")
        def _(x, weight, bias):
            _cxx_one_device("dwconv_gelu_forward", [("x", x), ("weight", weight), ("bias", bias)])
            return torch.empty_like(x)

        @torch.library.register_fake("segnext_C::dwconv_gelu_backward")
        def _(grad, x, weight, bias):
            _cxx_one_device("dwconv_gelu_backward", [("x", x), ("grad", grad),
                                                     ("weight", weight), ("bias", bias)])
            return [torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)]

    if _cxx_kernel("mlp_forward", "CPU"):
        @torch.library.register_fake("segnext_C::mlp_forward")
        def _(x, weights):
            _cxx_one_device("mlp_forward", [("x", x)] + _weights_named(weights))
            return torch.empty_like(x)

    if _cxx_kernel("nmf2d_forward", "CPU"):
        @torch.library.register_fake("segnext_C::nmf2d_forward")
        def _(x, bases, S, steps, eps, inv_t):
            return torch.empty_like(x, dtype=_nmf2d_forward_dtype(x))

    if _cxx_kernel("conv1x1_forward", "CPU"):
        @torch.library.register_fake("segnext_C::conv1x1_forward")
        def _(x, weight, bias, act, residual, scale):
            return _conv1x1_out(x, weight)


def _nmf2d_forward_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _conv1x1_out(x: Tensor, weight: Tensor) -> Tensor:
    B, _, H, W = x.shape
    return x.new_empty((B, weight.shape[0], H, W)).contiguous(memory_format=memory_format_of(x))


_register_cxx_fakes()

# --------------------------------------------------------------------------------------------
# msca: the fused multi-scale convolutional attention
# --------------------------------------------------------------------------------------------


def _msca_kernels(backend: str):
    """(forward(u, weights), backward(grad, u, weights)) of a backend for MSCA; ``weights``: the
    16 tensors of segnext_kernels.msca.reference.MSCAWeights."""
    if backend == "triton":
        mod = importlib.import_module("segnext_kernels.msca.triton")
        return (lambda u, w: mod.msca_forward(u, *w),
                lambda grad, u, w: mod.msca_backward(grad, u, *w))
    if backend in ("cpu", "cuda"):
        _extension.require()  # a clear error naming the fix when _C is missing
        return torch.ops.segnext_C.msca_forward, torch.ops.segnext_C.msca_backward
    raise ValueError(f"msca has no fused kernel for backend {backend!r}")


@torch.library.custom_op("segnext::msca", mutates_args=())
def msca_op(u: Tensor, weights: List[Tensor], backend: str) -> Tensor:
    """``weights``: the 16 tensors of MSCAWeights."""
    _one_device("msca", [("u", u)] + _weights_named(weights))
    fwd, _ = _msca_kernels(backend)
    ran("msca", backend)
    return fwd(u, weights)


@msca_op.register_fake
def _(u, weights, backend):
    _one_device("msca", [("u", u)] + _weights_named(weights))
    return torch.empty_like(u)


@torch.library.custom_op("segnext::msca_backward", mutates_args=())
def msca_backward_op(grad: Tensor, u: Tensor, weights: List[Tensor], backend: str) -> List[Tensor]:
    """Returns [grad_u, then the 16 weight/bias gradients in MSCAWeights order]."""
    _one_device("msca_backward", [("u", u), ("grad", grad)] + _weights_named(weights))
    _, bwd = _msca_kernels(backend)
    ran("msca_backward", backend)
    return list(bwd(grad, u, weights))


@msca_backward_op.register_fake
def _(grad, u, weights, backend):
    _one_device("msca_backward", [("u", u), ("grad", grad)] + _weights_named(weights))
    return [torch.empty_like(u)] + [torch.empty_like(w) for w in weights]


def _msca_setup_context(ctx, inputs, output):
    u, weights, ctx.backend = inputs
    ctx.save_for_backward(u, *weights)  # nothing of u's size but u


def _msca_backward(ctx, grad):
    u, *weights = ctx.saved_tensors
    grad_u, *grad_weights = msca_backward_op(grad.contiguous(memory_format=memory_format_of(u)),
                                             u, weights, ctx.backend)
    return grad_u, grad_weights, None


torch.library.register_autograd("segnext::msca", _msca_backward, setup_context=_msca_setup_context)


def msca_fused(u: Tensor, weights: Sequence[Tensor], backend: str) -> Tensor:
    return msca_op(u, list(weights), backend)

# --------------------------------------------------------------------------------------------
# dwconv_gelu: the MLP's depthwise 3x3 conv + bias + GELU
# --------------------------------------------------------------------------------------------
def _dwconv_gelu_kernels(backend: str):
    if backend == "cpu":
        _extension.require()
        return torch.ops.segnext_C.dwconv_gelu_forward, torch.ops.segnext_C.dwconv_gelu_backward
    raise ValueError(f"dwconv_gelu has no fused kernel for backend {backend!r}")


@torch.library.custom_op("segnext::dwconv_gelu", mutates_args=())
def dwconv_gelu_op(x: Tensor, weight: Tensor, bias: Tensor, backend: str) -> Tensor:
    _one_device("dwconv_gelu", [("x", x), ("weight", weight), ("bias", bias)])
    fwd, _ = _dwconv_gelu_kernels(backend)
    ran("dwconv_gelu", backend)
    return fwd(x, weight, bias)


@dwconv_gelu_op.register_fake
def _(x, weight, bias, backend):
    _one_device("dwconv_gelu", [("x", x), ("weight", weight), ("bias", bias)])
    return torch.empty_like(x)


@torch.library.custom_op("segnext::dwconv_gelu_backward", mutates_args=())
def dwconv_gelu_backward_op(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor,
                            backend: str) -> List[Tensor]:
    """[grad_x, grad_weight, grad_bias]."""
    named = [("x", x), ("grad", grad), ("weight", weight), ("bias", bias)]
    _one_device("dwconv_gelu_backward", named)
    _, bwd = _dwconv_gelu_kernels(backend)
    ran("dwconv_gelu_backward", backend)
    return list(bwd(grad, x, weight, bias))


@dwconv_gelu_backward_op.register_fake
def _(grad, x, weight, bias, backend):
    _one_device("dwconv_gelu_backward", [("x", x), ("grad", grad), ("weight", weight),
                                         ("bias", bias)])
    return [torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)]


def _dwconv_gelu_setup_context(ctx, inputs, output):
    x, weight, bias, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(x, weight, bias)  # z and gelu'(z) are recomputed from x


def _dwconv_gelu_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    gx, gw, gb = dwconv_gelu_backward_op(grad.contiguous(memory_format=memory_format_of(x)), x,
                                         weight, bias, ctx.backend)
    return gx, gw, gb, None


torch.library.register_autograd("segnext::dwconv_gelu", _dwconv_gelu_backward,
                                setup_context=_dwconv_gelu_setup_context)


def dwconv_gelu_fused(x: Tensor, weight: Tensor, bias: Tensor, backend: str) -> Tensor:
    return dwconv_gelu_op(x, weight, bias, backend)

# --------------------------------------------------------------------------------------------
# mlp: the whole MSCAN MLP, fc2(gelu(dw3x3(fc1(x)))), for inference (no autograd formula: the
# functional wrapper runs fc1, dwconv_gelu and fc2 when a gradient is needed)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("segnext::mlp", mutates_args=())
def mlp_op(x: Tensor, weights: List[Tensor], backend: str) -> Tensor:
    """``weights``: w1, b1, wd, bd, w2, b2."""
    _one_device("mlp", [("x", x)] + _weights_named(weights))
    if backend != "cpu":
        raise ValueError(f"mlp has no fused kernel for backend {backend!r}")
    _extension.require()
    ran("mlp", backend)
    return torch.ops.segnext_C.mlp_forward(x, weights)


@mlp_op.register_fake
def _(x, weights, backend):
    _one_device("mlp", [("x", x)] + _weights_named(weights))
    return torch.empty_like(x)


def mlp_fused(x: Tensor, weights: Sequence[Tensor], backend: str) -> Tensor:
    return mlp_op(x, list(weights), backend)

# --------------------------------------------------------------------------------------------
# nmf2d: the NMF decomposition of Hamburger (X (b, D, N), bases (b, D, R) -> reconstruction)
# --------------------------------------------------------------------------------------------
# One op runs the whole decomposition (init, all steps, reconstruction) in the backend's fused
# kernels and returns, besides Y, the small per-step state (R columns) its backward needs; the
# backward op runs the fused reverse pass over it (no autograd graph of the iterations).
def _nmf_kernels(backend: str):
    """The module of a backend's NMF2D kernels: ``nmf_forward``, ``nmf_backward`` and
    ``ring_sizes`` (how many steps of state it saves), with the signatures of
    segnext_kernels.nmf2d.triton. A CUDA or CPU backend adds a branch here."""
    if backend == "triton":
        return importlib.import_module("segnext_kernels.nmf2d.triton")
    raise ValueError(f"nmf2d has no fused kernel for backend {backend!r}")


@torch.library.custom_op("segnext::nmf2d", mutates_args=())
def nmf2d_op(X: Tensor, bases: Tensor, steps: int, eps: float, inv_t: float, grad: str,
             save: bool, backend: str) -> List[Tensor]:
    """X (b, D, N), bases (b, D, R) float32 → [Y (b, D, N), then the saved state: bases, coef,
    numerator (Xᵀ B), P (X coef) and H (coefᵀ coef) per step]; ``save`` keeps every step (needed
    by the ``unrolled`` backward), else only the last ones."""
    _one_device("nmf2d", [("X", X), ("bases", bases)])
    fwd = _nmf_kernels(backend).nmf_forward
    ran("nmf2d", backend)
    return list(fwd(X, bases, steps, eps, inv_t, save and grad == "unrolled"))


@nmf2d_op.register_fake
def _(X, bases, steps, eps, inv_t, grad, save, backend):
    _one_device("nmf2d", [("X", X), ("bases", bases)])
    b, D, N = X.shape
    R = bases.shape[2]
    nB, nC, nU, nP = _nmf_kernels(backend).ring_sizes(steps, save and grad == "unrolled")
    new = X.new_empty
    return [new((b, D, N)), new((b, nB, D, R)), new((b, nC, N, R)), new((b, nU, N, R)),
            new((b, nP, D, R)), new((b, nP, R, R))]


@torch.library.custom_op("segnext::nmf2d_backward", mutates_args=())
def nmf2d_backward_op(grad_y: Tensor, X: Tensor, saved: List[Tensor], steps: int, eps: float,
                      inv_t: float, grad: str, backend: str) -> List[Tensor]:
    """[dX, dbases]; dbases is an empty tensor for ``one_step`` (its gradient is None)."""
    _one_device("nmf2d_backward", [("X", X), ("grad_y", grad_y)] + _weights_named(saved, "saved"))
    bwd = _nmf_kernels(backend).nmf_backward
    ran("nmf2d_backward", backend)
    dX, dB = bwd(grad_y, X, *saved, steps, eps, inv_t, grad)
    return [dX, dB if dB is not None else X.new_empty((0,))]


@nmf2d_backward_op.register_fake
def _(grad_y, X, saved, steps, eps, inv_t, grad, backend):
    b, D, N = X.shape
    R = saved[0].shape[3]
    dB = X.new_empty((b, D, R)) if grad == "unrolled" else X.new_empty((0,))
    return [X.new_empty((b, D, N)), dB]


def _nmf2d_setup_context(ctx, inputs, output):
    X, bases, steps, eps, inv_t, grad, save, backend = inputs
    ctx.args = (steps, eps, inv_t, grad, backend)
    ctx.save_for_backward(X, *output[1:])  # X is the input; the rest has R columns


def _nmf2d_backward(ctx, grads):
    # The kernels refuse an unrolled backward from a forward run with save=False (no history).
    steps, eps, inv_t, grad, backend = ctx.args
    X, *saved = ctx.saved_tensors
    gY = grads[0]
    if gY is None:
        gY = torch.zeros_like(X)
    dX, dB = nmf2d_backward_op(gY.contiguous(), X, saved, steps, eps, inv_t, grad, backend)
    return dX, (dB if grad == "unrolled" else None), None, None, None, None, None, None


torch.library.register_autograd("segnext::nmf2d", _nmf2d_backward,
                                setup_context=_nmf2d_setup_context)


def nmf2d_fused(X: Tensor, bases: Tensor, steps: int, eps: float, inv_t: float, grad: str,
                backend: str) -> Tensor:
    """Reconstruction (b, D, N) of X (b, D, N) from bases (b, D, R), both contiguous float32."""
    save = torch.is_grad_enabled() and (X.requires_grad or bases.requires_grad)
    return nmf2d_op(X, bases, steps, eps, inv_t, grad, save, backend)[0]


# --------------------------------------------------------------------------------------------
# nmf2d, cpu backend: inference only (csrc/cpu/nmf2d_cpu.cpp). It takes the (B, C, H, W) map
# itself (channels-last holds Xᵀ, which its GEMMs read in place), S groups of D = C/S channels,
# and checks that x is non-negative as it reads it; returns float32 (float64 for float64 x).
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("segnext::nmf2d_inference", mutates_args=())
def nmf2d_inference_op(x: Tensor, bases: Tensor, S: int, steps: int, eps: float,
                       inv_t: float) -> Tensor:
    _one_device("nmf2d", [("x", x), ("bases", bases)])
    _extension.require()
    ran("nmf2d", "cpu")
    return torch.ops.segnext_C.nmf2d_forward(x, bases, S, steps, eps, inv_t)


@nmf2d_inference_op.register_fake
def _(x, bases, S, steps, eps, inv_t):
    _one_device("nmf2d", [("x", x), ("bases", bases)])
    return torch.empty_like(x, dtype=_nmf2d_forward_dtype(x))


def nmf2d_inference(x: Tensor, bases: Tensor, S: int, steps: int, eps: float,
                    inv_t: float) -> Tensor:
    """Reconstruction (B, C, H, W) of x (B, C, H, W) >= 0 from bases (B*S, C/S, R)."""
    return nmf2d_inference_op(x, bases.contiguous(), S, steps, eps, inv_t)


# --------------------------------------------------------------------------------------------
# conv1x1: a 1x1 conv with its epilogue (activation, scaled residual), inference only
# (csrc/cpu/conv1x1_cpu.cpp); the functional runs the reference when autograd needs a graph.
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("segnext::conv1x1", mutates_args=())
def conv1x1_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str,
               residual: Optional[Tensor], scale: Optional[Tensor], backend: str) -> Tensor:
    named = [("x", x), ("weight", weight)] + [(n, t) for n, t in (("bias", bias),
             ("residual", residual), ("scale", scale)) if t is not None]
    _one_device("conv1x1", named)
    if backend != "cpu":
        raise ValueError(f"conv1x1 has no fused kernel for backend {backend!r}")
    _extension.require()
    ran("conv1x1", backend)
    return torch.ops.segnext_C.conv1x1_forward(x, weight, bias, act, residual, scale)


@conv1x1_op.register_fake
def _(x, weight, bias, act, residual, scale, backend):
    return _conv1x1_out(x, weight)


def conv1x1_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str,
                  residual: Optional[Tensor], scale: Optional[Tensor], backend: str) -> Tensor:
    return conv1x1_op(x, weight, bias, act, residual, scale, backend)
