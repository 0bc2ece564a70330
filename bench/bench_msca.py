"""Level "msca": the whole multi-scale convolutional attention, forward and forward+backward;
and (level "memory") the bytes it saves for backward.

Variants: the eager reference (``msca_ref``: the official module's 7 depthwise convs, 3 adds,
1x1 conv and multiply) in NCHW and channels_last — the baselines —, ``torch.compile`` of the
reference (channels_last), and ``segnext_kernels.msca`` on every fused backend of the device
(``op_backends()["msca"]``: ``cpu`` on CPU, ``triton`` and ``cuda`` on CUDA), both layouts.
Forward runs under ``torch.no_grad``; forward+backward computes the gradients of u and of the
16 weights (what a training step needs).
"""
from __future__ import annotations

from functools import partial
from typing import List, Tuple

import torch

from . import roofline
from .common import SavedBytes, op_make, op_variants, segnext_stage_shapes, to_layout
from .runner import Case, Config


def shapes(cfg: Config) -> List[Tuple[int, int, int, int]]:
    if cfg.op_shapes == "segnext":
        return [dims[:4] for dims in segnext_stage_shapes()]
    if cfg.size == "smoke":
        return [(1, 8, 16, 16)]
    if cfg.cuda:
        # MSCAN-B stages 1 and 3 at 512x512 (docs/kernels.md#msca-cost)
        return [(16, 64, 128, 128), (16, 320, 32, 32)]
    if cfg.size == "quick":
        return [(2, 64, 128, 128), (2, 320, 32, 32)]
    return [(2, 64, 128, 128), (2, 320, 32, 32), (1, 32, 256, 256)]


def _weights(C: int, cfg: Config, requires_grad: bool):
    from segnext_kernels import MSCA
    module = MSCA(C).to(device=cfg.device, dtype=cfg.dtype)  # the official init
    return [w.detach().clone().requires_grad_(requires_grad) for w in module.weights()]


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    out, notes = [], []
    for B, C, H, W in shapes(cfg):
        for backward in (False, True):
            make = op_make("msca", (B, C, H, W), partial(_weights, C, cfg, backward), cfg,
                           backward)
            variants, ns = op_variants("msca", cfg, make)
            notes += ns
            out.append(Case(level="msca", pass_="fwd+bwd" if backward else "fwd",
                            shape=f"B{B} C{C} {H}x{W}", params=dict(B=B, C=C, H=H, W=W),
                            dtype=cfg.dtype_name, variants=variants,
                            cost=roofline.msca_cost(B, C, H, W, cfg.dtype, backward)))
    return out, list(dict.fromkeys(notes))


# --------------------------------------------------------------------------------------------
# Memory level: bytes saved for backward by one forward with gradients
# --------------------------------------------------------------------------------------------
def _make_saved(dims, cfg: Config):
    """``make(layout, backend)`` of the memory level's variants: the bytes one forward of
    ``msca_ref`` or of ``segnext_kernels.msca`` on ``backend`` saves for backward."""
    def make_for(layout, backend="reference"):
        def make():
            import segnext_kernels as sk
            weights = _weights(dims[1], cfg, requires_grad=True)
            u = to_layout(torch.randn(dims, device=cfg.device, dtype=cfg.dtype), layout).requires_grad_(True)

            def op(x):
                if backend == "reference":
                    return sk.msca_ref(x, *weights)
                return sk.msca(x, *weights, backend=backend)

            def saved_bytes():
                counter = SavedBytes(exclude=weights)
                with counter.hooks():
                    out = op(u)
                del out
                return counter.total
            return saved_bytes
        return make
    return make_for


def memory_cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    out, notes = [], []
    for B, C, H, W in shapes(cfg):
        variants, ns = op_variants("msca", cfg, _make_saved((B, C, H, W), cfg), compiled=False)
        notes += ns
        out.append(Case(level="memory", pass_="msca saved", shape=f"B{B} C{C} {H}x{W}",
                        params=dict(B=B, C=C, H=H, W=W), dtype=cfg.dtype_name,
                        variants=variants, metric="bytes",
                        unit_bytes=B * C * H * W * roofline.elsize(cfg.dtype)))
    return out, list(dict.fromkeys(notes))
