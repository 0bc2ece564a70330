"""torch.library registration of every op, in one place.

Each op is a ``torch.library.custom_op`` with a hand-written fake (shapes and strides equal to
the real kernels') and a registered autograd formula, so it works under ``torch.compile``
(fullgraph), ``opcheck``, autocast (handled by the functional wrappers) and DDP. The backend name
is an argument of the op: the wrappers resolve it when they are called (at trace time under
``torch.compile``), and the op runs that backend's kernel.

Kernels per backend (each imported lazily, on first use):
- triton: ``segnext_kernels.<op>.triton`` (Python module of Triton kernels);
- cpu / cuda: the C++ ops ``torch.ops.segnext.*`` of ``segnext_kernels._C``, one schema with
  CPU and CUDA implementations (csrc/).
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


def _weights_named(weights, prefix="weights"):
    return [(f"{prefix}[{i}]", w) for i, w in enumerate(weights)]

# --------------------------------------------------------------------------------------------
# strip_conv: depthwise 1xk / kx1 convolution with bias (the first op of _C; CPU only)
# --------------------------------------------------------------------------------------------
def _register_cxx_fakes() -> None:
    if not _extension.available():
        return

    @torch.library.register_fake("segnext::strip_conv")
    def _(x, weight, bias):
        _one_device("strip_conv", [("x", x), ("weight", weight)]
                    + ([("bias", bias)] if bias is not None else []))
        return torch.empty_like(x)

    if _cxx_kernel("msca_fwd", "CPU") or _cxx_kernel("msca_fwd", "CUDA"):
        # Called only inside the msca custom op below; fakes keep them traceable on their own.
        @torch.library.register_fake("segnext::msca_fwd")
        def _(u, *w):
            _one_device("msca_fwd", [("u", u)] + _weights_named(w))
            return torch.empty_like(u)

        @torch.library.register_fake("segnext::msca_bwd")
        def _(grad, u, *w):
            _one_device("msca_bwd", [("u", u), ("grad", grad)] + _weights_named(w))
            return [torch.empty_like(u)] + [torch.empty_like(t) for t in w]

    if _cxx_kernel("dwconv3x3_gelu_fwd", "CPU"):
        @torch.library.register_fake("segnext::dwconv3x3_gelu_fwd")
        def _(x, weight, bias):
            _one_device("dwconv3x3_gelu_fwd", [("x", x), ("weight", weight), ("bias", bias)])
            return torch.empty_like(x)

        @torch.library.register_fake("segnext::dwconv3x3_gelu_bwd")
        def _(grad, x, weight, bias):
            _one_device("dwconv3x3_gelu_bwd", [("x", x), ("grad", grad), ("weight", weight),
                                               ("bias", bias)])
            return [torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)]

    if _cxx_kernel("mlp_fwd", "CPU"):
        @torch.library.register_fake("segnext::mlp_fwd")
        def _(x, *weights):
            _one_device("mlp_fwd", [("x", x)] + _weights_named(weights))
            return torch.empty_like(x)


_register_cxx_fakes()

# --------------------------------------------------------------------------------------------
# msca: the fused multi-scale convolutional attention
# --------------------------------------------------------------------------------------------


def _msca_kernels(backend: str):
    """(forward, backward) callables of a backend for MSCA."""
    if backend == "triton":
        mod = importlib.import_module("segnext_kernels.msca.triton")
        return mod.msca_forward, mod.msca_backward
    if backend in ("cpu", "cuda"):
        _extension.require()  # a clear error naming the fix when _C is missing
        return torch.ops.segnext.msca_fwd, torch.ops.segnext.msca_bwd
    raise ValueError(f"msca has no fused kernel for backend {backend!r}")


@torch.library.custom_op("segnext::msca", mutates_args=())
def msca_op(u: Tensor, w0: Tensor, b0: Tensor, w0_1: Tensor, b0_1: Tensor, w0_2: Tensor,
            b0_2: Tensor, w1_1: Tensor, b1_1: Tensor, w1_2: Tensor, b1_2: Tensor, w2_1: Tensor,
            b2_1: Tensor, w2_2: Tensor, b2_2: Tensor, w3: Tensor, b3: Tensor,
            backend: str) -> Tensor:
    weights = (w0, b0, w0_1, b0_1, w0_2, b0_2, w1_1, b1_1, w1_2, b1_2, w2_1, b2_1, w2_2, b2_2, w3, b3)
    _one_device("msca", [("u", u)] + _weights_named(weights))
    fwd, _ = _msca_kernels(backend)
    ran("msca", backend)
    return fwd(u, *weights)


@msca_op.register_fake
def _(u, *args):
    _one_device("msca", [("u", u)] + _weights_named(args[:-1]))
    return torch.empty_like(u)


@torch.library.custom_op("segnext::msca_backward", mutates_args=())
def msca_backward_op(grad: Tensor, u: Tensor, weights: List[Tensor], backend: str) -> List[Tensor]:
    """Returns [grad_u, then the 16 weight/bias gradients in the op's argument order]."""
    _one_device("msca_backward", [("u", u), ("grad", grad)] + _weights_named(weights))
    _, bwd = _msca_kernels(backend)
    ran("msca_backward", backend)
    return list(bwd(grad, u, *weights))


@msca_backward_op.register_fake
def _(grad, u, weights, backend):
    _one_device("msca_backward", [("u", u), ("grad", grad)] + _weights_named(weights))
    return [torch.empty_like(u)] + [torch.empty_like(w) for w in weights]


def _msca_setup_context(ctx, inputs, output):
    ctx.backend = inputs[-1]
    ctx.save_for_backward(*inputs[:-1])  # u and the 16 weights: nothing of u's size but u


def _msca_backward(ctx, grad):
    u, *weights = ctx.saved_tensors
    grads = msca_backward_op(grad.contiguous(memory_format=memory_format_of(u)), u, weights,
                             ctx.backend)
    return (*grads, None)


torch.library.register_autograd("segnext::msca", _msca_backward, setup_context=_msca_setup_context)


def msca_fused(u: Tensor, weights: Sequence[Tensor], backend: str) -> Tensor:
    return msca_op(u, *weights, backend)

# --------------------------------------------------------------------------------------------
# dwconv_gelu: the MLP's depthwise 3x3 conv + bias + GELU
# --------------------------------------------------------------------------------------------
def _dwconv_gelu_kernels(backend: str):
    if backend == "cpu":
        _extension.require()
        return torch.ops.segnext.dwconv3x3_gelu_fwd, torch.ops.segnext.dwconv3x3_gelu_bwd
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
def mlp_op(x: Tensor, w1: Tensor, b1: Tensor, wd: Tensor, bd: Tensor, w2: Tensor, b2: Tensor,
           backend: str) -> Tensor:
    _one_device("mlp", [("x", x)] + _weights_named((w1, b1, wd, bd, w2, b2)))
    if backend != "cpu":
        raise ValueError(f"mlp has no fused kernel for backend {backend!r}")
    _extension.require()
    ran("mlp", backend)
    return torch.ops.segnext.mlp_fwd(x, w1, b1, wd, bd, w2, b2)


@mlp_op.register_fake
def _(x, *args):
    _one_device("mlp", [("x", x)] + _weights_named(args[:-1]))
    return torch.empty_like(x)


def mlp_fused(x: Tensor, weights: Sequence[Tensor], backend: str) -> Tensor:
    return mlp_op(x, *weights, backend)

# --------------------------------------------------------------------------------------------
# nmf2d: the NMF decomposition of Hamburger (X (b, D, N), bases (b, D, R) -> reconstruction)
# --------------------------------------------------------------------------------------------
# One op runs the whole decomposition (init, all steps, reconstruction) in the backend's fused
# kernels and returns, besides Y, the small per-step state (R columns) its backward needs; the
# backward op runs the fused reverse pass over it (no autograd graph of the iterations).
def _nmf_kernels(backend: str):
    """The module of a backend's NMF2D kernels: ``nmf_forward``, ``nmf_backward`` and
    ``ring_sizes`` (how many steps of state it saves), with the signatures of
    segnext_kernels.nmf.triton. A CUDA or CPU backend adds a branch here."""
    if backend == "triton":
        return importlib.import_module("segnext_kernels.nmf.triton")
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
# nmf2d, cpu backend: inference only (csrc/cpu/nmf_cpu.cpp). It takes the (B, C, H, W) map
# itself (channels-last holds Xᵀ, which its GEMMs read in place), S groups of D = C/S channels,
# and checks that x is non-negative as it reads it; returns float32 (float64 for float64 x).
# --------------------------------------------------------------------------------------------
def _nmf2d_cpu_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


if _cxx_kernel("nmf2d_fwd", "CPU"):
    @torch.library.register_fake("segnext::nmf2d_fwd")
    def _(x, bases, S, steps, eps, inv_t):
        return torch.empty_like(x, dtype=_nmf2d_cpu_dtype(x))


@torch.library.custom_op("segnext::nmf2d_cpu", mutates_args=())
def nmf2d_cpu_op(x: Tensor, bases: Tensor, S: int, steps: int, eps: float,
                 inv_t: float) -> Tensor:
    _one_device("nmf2d", [("x", x), ("bases", bases)])
    _extension.require()
    ran("nmf2d", "cpu")
    return torch.ops.segnext.nmf2d_fwd(x, bases, S, steps, eps, inv_t)


@nmf2d_cpu_op.register_fake
def _(x, bases, S, steps, eps, inv_t):
    _one_device("nmf2d", [("x", x), ("bases", bases)])
    return torch.empty_like(x, dtype=_nmf2d_cpu_dtype(x))


def nmf2d_cpu(x: Tensor, bases: Tensor, S: int, steps: int, eps: float, inv_t: float) -> Tensor:
    """Reconstruction (B, C, H, W) of x (B, C, H, W) >= 0 from bases (B*S, C/S, R)."""
    return nmf2d_cpu_op(x, bases.contiguous(), S, steps, eps, inv_t)


# --------------------------------------------------------------------------------------------
# conv1x1: a 1x1 conv with its epilogue (activation, scaled residual), inference only
# (csrc/cpu/conv1x1_cpu.cpp); the functional runs the reference when autograd needs a graph.
# --------------------------------------------------------------------------------------------
def _conv1x1_out(x: Tensor, weight: Tensor) -> Tensor:
    B, _, H, W = x.shape
    return x.new_empty((B, weight.shape[0], H, W)).contiguous(memory_format=memory_format_of(x))


if _cxx_kernel("conv1x1_fwd", "CPU"):
    @torch.library.register_fake("segnext::conv1x1_fwd")
    def _(x, weight, bias, act, residual, scale):
        return _conv1x1_out(x, weight)


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
    return torch.ops.segnext.conv1x1_fwd(x, weight, bias, act, residual, scale)


@conv1x1_op.register_fake
def _(x, weight, bias, act, residual, scale, backend):
    return _conv1x1_out(x, weight)


def conv1x1_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str,
                  residual: Optional[Tensor], scale: Optional[Tensor], backend: str) -> Tensor:
    return conv1x1_op(x, weight, bias, act, residual, scale, backend)
