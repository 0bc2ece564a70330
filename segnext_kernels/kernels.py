"""The kernel table: for each op, each backend's kernel and what it takes.

One entry per (op, backend): the dtypes and memory formats it has code for, whether it has a
backward, its size limits, and the rule ``auto`` uses to decide that it beats the reference at
a call (``faster``; absent = always). Dispatch (segnext_kernels/dispatch.py) reads nothing else.

The CPU ``faster`` rules come from measurements of every op shape of SegNeXt-T/S/B, kept under
bench/results/ and explained in docs/dispatch.md (``note`` names the file). GPU kernels have no
rule: auto takes them (none has been timed on a GPU yet).
"""
from __future__ import annotations

import torch

from . import _extension
from .dispatch import Kernel, Problem, register

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
_CROSSOVER = "bench/results/crossover_cpu_zen5.md"  # fused vs eager at every SegNeXt op shape
_AUTO_CHECK = "bench/results/auto_cpu_zen5.md"  # auto vs the best eager layout, wall time


def _cxx_kernel(op: str, dispatch_key: str) -> bool:
    """Whether _C registered an implementation of its kernel ``segnext_C::<op>`` (``<op>`` an
    ``<name>_forward`` / ``<name>_backward``) for ``dispatch_key``."""
    if not _extension.available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"segnext_C::{op}", dispatch_key)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _triton_device_limits(device_type: str, dtype: torch.dtype):
    # Triton's interpreter computes bfloat16 as NaN without an error.
    if device_type == "cpu" and dtype == BF16:
        return "bfloat16 is not supported by Triton's CPU interpreter"
    return None


# ---- msca ---------------------------------------------------------------------------------

def _msca_triton_limits(p: Problem):
    if _numel(p.shape[1:]) >= 2 ** 31:  # int32 offsets within one image
        return "2**31 or more elements per image"
    return None


def _msca_cuda_limits(p: Problem):
    if max(p.shape) > 2 ** 31 - 1:
        return "a dimension of 2**31 or more"
    return None


def _msca_cpu_faster(p: Problem) -> bool:
    # Everywhere but channels-last inference on a map of 16x16 or less with 512 channels or
    # more (SegNeXt-S/B/L's last stage), where oneDNN's 1x1 conv over so few pixels beats the
    # fused kernel's GEMM in wall time on two threads.
    return not (p.layout == "channels_last" and not p.grad
                and p.shape[2] * p.shape[3] <= 16 * 16 and p.shape[1] >= 512)


register(Kernel("msca", "cpu", (F32, F16, BF16, F64), present=_cxx_kernel("msca_forward", "CPU"),
                faster=_msca_cpu_faster, note=_AUTO_CHECK))
register(Kernel("msca", "triton", (F32, F16, BF16), limits=_msca_triton_limits,
                device_limits=_triton_device_limits))
register(Kernel("msca", "cuda", (F32, F16, BF16), present=_cxx_kernel("msca_forward", "CUDA"),
                limits=_msca_cuda_limits))

# ---- dwconv_gelu --------------------------------------------------------------------------


def _dwconv_gelu_cpu_faster(p: Problem) -> bool:
    # Channels-last: the forward wins below 128x128 and is at parity above; the backward is
    # compute-bound on GELU' and the recomputed conv and loses to oneDNN's. NCHW: both win from
    # 64x64 up; below, the per-plane overhead of a few hundred tiny planes dominates.
    pixels = p.shape[2] * p.shape[3]
    if p.layout == "channels_last":
        return not p.grad and pixels < 128 * 128
    return pixels >= 64 * 64


register(Kernel("dwconv_gelu", "cpu", (F32, F16, BF16, F64),
                present=_cxx_kernel("dwconv_gelu_forward", "CPU"), faster=_dwconv_gelu_cpu_faster,
                note=_CROSSOVER))

# ---- mlp (inference only) ------------------------------------------------------------------

# The fused MLP (its 1x1 convs on register-tiled GEMMs, packed weights cached) is faster than
# the best eager layout at every MSCAN stage of SegNeXt-T/S/B, in both layouts.
register(Kernel("mlp", "cpu", (F32, F16, BF16, F64), backward=False,
                present=_cxx_kernel("mlp_forward", "CPU"), note=_CROSSOVER))

# ---- nmf2d --------------------------------------------------------------------------------

NMF_TRITON_MAX_RANK = 128  # the largest rank the Triton kernels are compiled and checked for


def _nmf_triton_limits(p: Problem):
    D, N, R = p.size("D"), p.size("N"), p.size("R")
    if R > NMF_TRITON_MAX_RANK:
        return f"rank R={R} above {NMF_TRITON_MAX_RANK}"
    if D * N >= 2 ** 31 or N * max(R, 16) >= 2 ** 31:
        return "2**31 or more elements per item"
    if (N + 15) // 16 > 65535:
        return f"N={N} beyond the grid limit"
    return None


register(Kernel("nmf2d", "triton", (F32,), layouts=("contiguous",), limits=_nmf_triton_limits,
                device_limits=_triton_device_limits))
# Inference only; reads the (B, C, H, W) map in place in either layout (channels-last fastest).
register(Kernel("nmf2d", "cpu", (F32, F64), backward=False,
                present=_cxx_kernel("nmf2d_forward", "CPU"),
                note="bench/results/cpu_inference_zen5.md"))

# ---- conv1x1 (inference only) --------------------------------------------------------------

# Channels-last only: another layout is copied to channels-last first.
register(Kernel("conv1x1", "cpu", (F32, F16, BF16, F64), backward=False,
                present=_cxx_kernel("conv1x1_forward", "CPU"),
                faster=lambda p: p.layout == "channels_last",
                note="bench/results/cpu_inference_zen5.md"))

# ---- strip_conv (forward only) ---------------------------------------------------------------

register(Kernel("strip_conv", "cpu", (F32, F16, BF16, F64), backward=False,
                present=_cxx_kernel("strip_conv_forward", "CPU"),
                faster=lambda p: p.layout == "contiguous",
                note="bench/results (strip level)"))
